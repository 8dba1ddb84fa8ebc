"""Tool-use samples in the Hermes / Qwen format, for the demo data generator.

A request lists one to three tools (OpenAI ``{"type": "function", "function": {...}}`` dicts;
the chat template renders them into the system prompt). Names, parameter names and
descriptions vary between samples so that the model learns to copy them from the listed
schemas rather than memorise one spelling; in training (``split="train"``) half the places
and half the tools are made up, so recalling a favourite never pays. A matching question is
answered with::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and, given a ``tool`` message with the result, with a sentence that uses that result.
"""

from __future__ import annotations

import json
import random

from tokenmill.demo.words import and_list

CITIES = ["Paris", "London", "Berlin", "Tokyo", "New York", "Madrid", "Rome", "Lisbon", "Oslo",
          "Cairo", "Sydney", "Toronto", "Chicago", "Seoul", "Beijing", "Mumbai", "Lagos",
          "Nairobi", "Lima", "Bogota", "Dublin", "Vienna", "Prague", "Warsaw", "Athens",
          "Istanbul", "Moscow", "Dubai", "Bangkok", "Jakarta", "Manila", "Hanoi", "Santiago",
          "Mexico City", "Boston", "Seattle", "Denver", "Miami", "Austin", "Zurich", "Geneva",
          "Amsterdam", "Brussels", "Stockholm", "Helsinki", "Copenhagen", "Reykjavik",
          "San Francisco", "Los Angeles", "Buenos Aires", "Cape Town", "Melbourne", "Auckland",
          "Vancouver", "Montreal", "Kyoto", "Osaka", "Munich", "Hamburg", "Milan", "Naples",
          "Barcelona", "Seville", "Porto", "Edinburgh", "Manchester", "Lyon", "Marseille"]

# Made-up places for training: thousands of names the model cannot memorise, so it learns to
# copy the place from the question instead of answering with a favourite city.
_HEADS = ["Bel", "Cor", "Dal", "Esk", "Fen", "Gar", "Hal", "Ist", "Jor", "Kel", "Lor", "Mar",
          "Nor", "Ost", "Pel", "Quen", "Ros", "Sal", "Tor", "Ul", "Val", "Wes", "Yar", "Zan",
          "Ash", "Brim", "Cal", "Dun", "Ev", "Glen", "Hav", "Kir", "Lin", "Mor", "Nev", "Or"]
_MIDS = ["", "", "a", "e", "i", "o", "an", "en", "ar", "or", "il", "us", "el"]
_TAILS = ["ton", "ford", "bury", "ville", "burg", "dale", "mouth", "haven", "stad", "grad",
          "polis", "mere", "wick", "port", "field", "more", "ia", "is", "o", "ek", "ana", "um"]
_PREFIXES = ["New ", "Port ", "San ", "Lake ", "North ", "East ", "Fort ", "Saint "]


def made_up_place(rng: random.Random) -> str:
    name = rng.choice(_HEADS) + rng.choice(_MIDS) + rng.choice(_TAILS)
    if rng.random() < 0.2:
        name = rng.choice(_PREFIXES) + name
    return name


def place(rng: random.Random, split: str) -> str:
    """A city for a question: real ones only when evaluating, half made-up when training."""
    if split == "train" and rng.random() < 0.5:
        return made_up_place(rng)
    return rng.choice(CITIES)


CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy",
              "partly cloudy", "light rain", "overcast", "hot and humid"]

SYMBOLS = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA", "META", "IBM", "INTC", "ORCL"]

TOPICS = ["tokenmill", "paged attention", "the history of Rome", "how bees make honey",
          "the tallest mountain", "continuous batching", "black holes", "the Python language",
          "healthy breakfast ideas", "the rules of chess"]


def _fn(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props, "required": required}}}


def _str(description: str) -> dict:
    return {"type": "string", "description": description}


# Each function name comes with its own parameter name, as real APIs do: the model looks the
# name up in the listed tools, and the name settles the parameter.
WEATHER_NAMES = {"get_weather": "city", "get_current_weather": "location",
                 "weather_lookup": "city", "lookup_weather": "location"}
CLOCK_NAMES = {"get_time": "city", "get_current_time": "location", "clock": "city",
               "current_time": "location"}
CALCULATOR_NAMES = {"calculator": "expression", "calculate": "expression", "evaluate": "expr",
                    "math": "expr"}
SEARCH_NAMES = {"search_web": "query", "web_search": "query", "search": "query"}
STOCK_NAMES = {"get_stock_price": "symbol", "stock_price": "symbol"}

# Training also lists tools under made-up names with made-up parameter names (half of them), so
# the model learns to copy both from the listed schema, as it must for a user's own tools,
# instead of choosing among the few names above. Every made-up name holds a made-up word
# (hundreds of thousands of them), so no made-up name recurs often enough to become a guess:
# with a few hundred names (run 7) the model learned `clock`, `time_now`, `math` and wrote them
# where `get_time` was listed.
_VERBS = ["get", "fetch", "lookup", "query", "check", "read", "find", "show", "load", "ask"]
_NOUNS = {"weather": ["weather", "forecast", "conditions", "wx", "climate"],
          "clock": ["time", "local_time", "hour", "city_time", "now"],
          "calculator": ["calc", "arithmetic", "compute", "expression", "sum"],
          "search": ["web", "web_results", "pages", "info", "docs"],
          "stock": ["stock", "quote", "ticker_price", "shares", "market_price"]}
_SUFFIXES = ["", "", "", "_v2", "_now", "_api", "_info", "_tool", "_today", "2"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gl", "kr", "pl", "st", "tr", "sk"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "x", "k", "m", "s", "th"]
_PARAMS = {"weather": ["city", "location", "place", "city_name", "where"],
           "clock": ["city", "location", "place", "city_name", "where"],
           "calculator": ["expression", "expr", "formula", "input", "math_expression"],
           "search": ["query", "q", "text", "search_terms", "topic"],
           "stock": ["symbol", "ticker", "code", "stock_symbol"]}
_REAL = {"weather": WEATHER_NAMES, "clock": CLOCK_NAMES, "calculator": CALCULATOR_NAMES,
         "search": SEARCH_NAMES, "stock": STOCK_NAMES}


def made_up_word(rng: random.Random) -> str:
    """Two or three syllables: ``zoumar``, ``kelith``, ``bradox``."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((2, 2, 3))))


def made_up_tool_name(rng: random.Random, kind: str) -> str:
    """A name holding a made-up word, in one of several shapes (verb first, noun first, word
    alone, camelCase): users' tools come in all of them (``lookup_weather``,
    ``weather_lookup``, ``zephyr``), so only the listed schema tells which one a request uses."""
    word, suffix = made_up_word(rng), rng.choice(_SUFFIXES)
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS[kind])
    shape = rng.random()
    if shape < 0.3:
        return f"{verb}_{word}{suffix}"
    if shape < 0.55:
        return f"{word}_{noun}{suffix}"
    if shape < 0.75:
        return f"{noun}_{word}{suffix}"
    if shape < 0.85:
        return f"{word}{suffix}"
    return verb + word.capitalize() + noun.split("_")[0].capitalize()


MADE_UP_TOOL_RATE = 0.5


def tool_name(rng: random.Random, kind: str, split: str) -> tuple[str, str]:
    """(function name, its main parameter's name) for a tool of ``kind``."""
    # NOTE: half, not more. With half, run 6's errors were mostly a familiar real sibling name
    # (get_current_weather where get_weather was listed); with 70% (run 7) tool calls fell from
    # 88.5% to 30.5%: the model wrote made-up-style names it had learned (clock, time_now, math)
    # instead of the listed one.
    if split == "train" and rng.random() < MADE_UP_TOOL_RATE:
        return made_up_tool_name(rng, kind), rng.choice(_PARAMS[kind])
    name = rng.choice(list(_REAL[kind]))
    return name, _REAL[kind][name]


def weather_tool(rng: random.Random, split: str) -> tuple[dict, dict]:
    name, place = tool_name(rng, "weather", split)
    props = {place: _str(rng.choice(["The city name, e.g. Paris", "The city to look up",
                                     "City name"]))}
    unit = rng.random() < 0.5
    if unit:
        props["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    desc = rng.choice(["Get the current weather in a city.", "Look up the weather.",
                       "Get the weather for a location."])
    return _fn(name, desc, props, [place]), {"place": place, "unit": unit}


def clock_tool(rng: random.Random, split: str) -> tuple[dict, dict]:
    name, place = tool_name(rng, "clock", split)
    desc = rng.choice(["Get the current local time in a city.", "Tell the time.",
                       "Return the current time for a location."])
    return _fn(name, desc, {place: _str("The city, e.g. Tokyo")}, [place]), {"place": place}


def calculator_tool(rng: random.Random, split: str) -> tuple[dict, dict]:
    name, arg = tool_name(rng, "calculator", split)
    desc = rng.choice(["Evaluate an arithmetic expression.", "A calculator.",
                       "Compute the value of a math expression."])
    return _fn(name, desc, {arg: _str("e.g. 12 * 34")}, [arg]), {"arg": arg}


def search_tool(rng: random.Random, split: str) -> tuple[dict, dict]:
    name, arg = tool_name(rng, "search", split)
    return _fn(name, "Search the web.", {arg: _str("The search query")}, [arg]), {"arg": arg}


def stock_tool(rng: random.Random, split: str) -> tuple[dict, dict]:
    name, arg = tool_name(rng, "stock", split)
    return _fn(name, "Get the latest stock price.", {arg: _str("Ticker, e.g. AAPL")},
               [arg]), {"arg": arg}


MAKERS = {"weather": weather_tool, "clock": clock_tool, "calculator": calculator_tool,
          "search": search_tool, "stock": stock_tool}
CALL_WEIGHTS = {"weather": 0.35, "clock": 0.25, "calculator": 0.25, "search": 0.08, "stock": 0.07}


def _question(rng: random.Random, kind: str, info: dict, split: str) -> tuple[str, dict, dict]:
    """(question, arguments, facts for the result) for a tool of ``kind``."""
    if kind == "weather":
        city = place(rng, split)
        q = rng.choice(["What's the weather in {c}?", "What is the weather like in {c}?",
                        "How warm is it in {c}?", "Is it raining in {c}?",
                        "Weather in {c}?", "Tell me the weather for {c}.",
                        "Do I need an umbrella in {c} today?", "how's the weather in {c}"])
        args = {info["place"]: city}
        q = q.format(c=city)
        if info["unit"] and rng.random() < 0.5:
            unit = rng.choice(["celsius", "fahrenheit"])
            q = q.rstrip("?.") + f" in {unit}?"
            args["unit"] = unit
        return q, args, {"city": city, "unit": args.get("unit", "celsius")}
    if kind == "clock":
        city = place(rng, split)
        q = rng.choice(["What time is it in {c}?", "What's the time in {c}?",
                        "Tell me the current time in {c}.", "time in {c}?",
                        "What is the local time in {c} right now?"]).format(c=city)
        return q, {info["place"]: city}, {"city": city}
    if kind == "calculator":
        op = rng.choice("+-*/")
        a, b = rng.randint(2, 9999), rng.randint(2, 999)
        if rng.random() < 0.3:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
        expr = f"{a} {op} {b}"
        q = rng.choice(["Use the calculator to compute {e}.", "What is {e}?", "Calculate {e}.",
                        "Please work out {e} with the calculator.", "{e} = ?"]).format(e=expr)
        return q, {info["arg"]: expr}, {"expr": expr, "value": _calc(a, op, b)}
    if kind == "search":
        topic = rng.choice(TOPICS)
        q = rng.choice(["Search the web for {t}.", "Look up {t} online.",
                        "Can you find information about {t}?"]).format(t=topic)
        return q, {info["arg"]: topic}, {"topic": topic}
    sym = rng.choice(SYMBOLS)
    q = rng.choice(["What is the stock price of {s}?", "How much is {s} trading at?",
                    "Get me the price of {s} stock."]).format(s=sym)
    return q, {info["arg"]: sym}, {"symbol": sym}


def _calc(a: int, op: str, b: int):
    v = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 2)}[op]
    return int(v) if float(v).is_integer() else v


def _result(rng: random.Random, kind: str, facts: dict) -> tuple[str, str, list[str]]:
    """(tool message content, the answer using it, strings the answer must mention)."""
    if kind == "weather":
        temp = rng.randint(-10, 40) if facts["unit"] == "celsius" else rng.randint(10, 105)
        cond, city = rng.choice(CONDITIONS), facts["city"]
        deg = "°C" if facts["unit"] == "celsius" else "°F"
        content = rng.choice([
            json.dumps({"city": city, "temperature": temp, "unit": facts["unit"],
                        "condition": cond}),
            json.dumps({"temperature": temp, "conditions": cond}),
            f"{temp}{deg}, {cond}"])
        answer = rng.choice([f"It is {cond} in {city}, with a temperature of {temp}{deg}.",
                             f"The weather in {city} is {cond} and {temp}{deg}.",
                             f"Right now {city} is {cond}, {temp}{deg}."])
        return content, answer, [str(temp), cond]
    if kind == "clock":
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        t = f"{h:02d}:{m:02d}"
        content = rng.choice([json.dumps({"city": facts["city"], "time": t}),
                              json.dumps({"time": t}), t])
        answer = rng.choice([f"It is {t} in {facts['city']}.",
                             f"The local time in {facts['city']} is {t}."])
        return content, answer, [t]
    if kind == "calculator":
        v = facts["value"]
        content = rng.choice([json.dumps({"result": v}), str(v)])
        answer = rng.choice([f"{facts['expr']} = {v}.", f"The result is {v}."])
        return content, answer, [str(v)]
    if kind == "search":
        snippet = f"{facts['topic'].capitalize()} is a popular topic with many articles."
        content = json.dumps({"results": [snippet]})
        return content, f"Here is what I found: {snippet}", [snippet]
    price = round(rng.uniform(10, 900), 2)
    content = json.dumps({"symbol": facts["symbol"], "price": price})
    return content, f"{facts['symbol']} is trading at {price}.", [str(price)]


def _toolset(rng: random.Random, kind: str | None, split: str) -> tuple[list[dict], dict, dict]:
    """Shuffled tools (including ``kind``'s when given): (tools, info per kind, name per kind)."""
    kinds = [k for k in MAKERS if k != kind]
    chosen = rng.sample(kinds, rng.choice([0, 1, 1, 2]) if kind else rng.choice([1, 2, 3]))
    if kind:
        chosen.append(kind)
    rng.shuffle(chosen)
    return _make_tools(rng, chosen, split)


def _make_tools(rng: random.Random, kinds: list[str], split: str
                ) -> tuple[list[dict], dict, dict]:
    """One tool per kind, in order: (tools, info per kind, name per kind)."""
    tools, info, names = [], {}, {}
    for k in kinds:
        tool, info[k] = MAKERS[k](rng, split)
        tools.append(tool)
        names[k] = tool["function"]["name"]
    return tools, info, names


def call_text(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _call_setup(rng: random.Random, split: str):
    kind = rng.choices(list(CALL_WEIGHTS), weights=list(CALL_WEIGHTS.values()))[0]
    tools, info, names = _toolset(rng, kind, split)
    q, args, facts = _question(rng, kind, info[kind], split)
    return kind, tools, names[kind], q, args, facts


def tool_call(rng: random.Random, split: str) -> tuple[list[dict], str, list[dict], dict]:
    """(messages, completion, tools, meta) of a question answered with a tool call."""
    kind, tools, name, q, args, facts = _call_setup(rng, split)
    return ([{"role": "user", "content": q}], call_text(name, args), tools,
            {"tool": name, "arguments": args, "steps": _call_steps(name, args)})


def _call_steps(name: str, args: dict) -> str:
    """What the <think> block says before a call (thinking on)."""
    return f"The user asks something that the {name} tool can answer. I call it with " \
           f"{json.dumps(args)}."


def _answer_steps(name: str, content: str) -> str:
    return f"The {name} tool returned {content}. I answer the question with it."


def tool_answer(rng: random.Random, split: str) -> tuple[list[dict], str, list[dict], dict]:
    """(messages, completion, tools, meta) of an answer given a tool's result."""
    kind, tools, name, q, args, facts = _call_setup(rng, split)
    content, answer, mentions = _result(rng, kind, facts)
    call = {"id": f"call_{rng.randrange(16 ** 8):08x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    messages = [{"role": "user", "content": q},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": content}]
    return messages, answer, tools, {"mentions": mentions, "steps": _answer_steps(name, content)}


def tools_without_calculator(rng: random.Random, split: str) -> list[dict]:
    """One to three tools, none of which computes arithmetic."""
    kinds = rng.sample([k for k in MAKERS if k != "calculator"], rng.choice([1, 2, 3]))
    return [MAKERS[k](rng, split)[0] for k in kinds]


Exchange = tuple[str, dict, list[dict], str]


def _round(rng: random.Random, kind: str, info: dict, name: str, split: str) -> Exchange:
    """One exchange: (question, arguments, [assistant message with the call, tool message],
    the answer that uses the result)."""
    q, args, facts = _question(rng, kind, info, split)
    content, answer, _ = _result(rng, kind, facts)
    call = {"id": f"call_{rng.randrange(16 ** 8):08x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    return q, args, [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": content}], answer


def tool_session(rng: random.Random, split: str) -> tuple[list[dict], str, list[dict], dict]:
    """A conversation of two to four tool exchanges over one tool list (for training).

    Every assistant turn in it is learned, so one system prompt (most of a tool sample's
    tokens) pays for several calls, each copying a different city, ticker or expression."""
    kinds = rng.sample(list(MAKERS), rng.choice([1, 2, 2, 3]))
    tools, info, names = _make_tools(rng, kinds, split)
    messages: list[dict] = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        kind = rng.choice(kinds)
        q, _, turns, answer = _round(rng, kind, info[kind], names[kind], split)
        messages += [{"role": "user", "content": q}] + turns + \
            [{"role": "assistant", "content": answer}]
    kind = rng.choice(kinds)
    q, args, turns, answer = _round(rng, kind, info[kind], names[kind], split)
    messages.append({"role": "user", "content": q})
    if rng.random() < 0.6:
        return messages, call_text(names[kind], args), tools, \
            {"tool": names[kind], "arguments": args, "steps": _call_steps(names[kind], args)}
    content = turns[-1]["content"]
    return messages + turns, answer, tools, {"steps": _answer_steps(names[kind], content)}


PURPOSES = {"weather": "check the weather", "clock": "tell the time in a city",
             "calculator": "work out a sum", "search": "search the web",
             "stock": "look up a stock price"}


def tool_list(rng: random.Random, split: str) -> tuple[list[dict], str, str, dict]:
    """(tools, question, answer, meta) about the listed tools themselves: "which tools do you
    have?" -> every name, or "which would you use to check the weather?" -> one name. Both copy
    names from the tool list far back in the system prompt, as a call must; run 9 never learned
    that from calls alone (0% of made-up names copied: it wrote a name from memory)."""
    tools, _, names = _toolset(rng, None, split)
    listed = [t["function"]["name"] for t in tools]
    if rng.random() < 0.5:
        q = rng.choice(["Which tools can you use?", "What functions do you have?",
                        "List your tools.", "What tools are available?"])
        answer = f"I can call {len(listed)} tool{'s' if len(listed) > 1 else ''}: " \
                 f"{and_list(listed)}."
        steps = "The user asks which tools I have. I list the names from the tool list."
    else:
        kind = rng.choice(list(names))
        q = rng.choice(["Which of your tools would you use to {p}?",
                        "What tool can {p}?", "Name the tool that can {p}."]).format(
            p=PURPOSES[kind])
        answer = f"I would use {names[kind]}."
        steps = f"The user asks which tool can {PURPOSES[kind]}. That is {names[kind]}."
    return tools, q, answer, {"names": listed, "steps": steps}
