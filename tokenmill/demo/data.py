"""A seeded generator of the demo model's data: chat samples and plain-text stories.

``generate(n, seed, split)`` returns ``n`` ``Sample``s drawn from ``MIX``. A chat sample is a
prompt (``messages``, ``tools``, ``thinking``) and the assistant ``completion`` to learn; the
training script renders the prompt with the chat template and puts the loss on the completion
and on the assistant turns inside the prompt. A story sample has an empty prompt and a plain-text ``completion``. ``meta`` holds what the
evaluation checks (the expected number, tool call, JSON object, ...).

The same (seed, split) always gives the same samples. ``split="eval"`` draws arithmetic only
from ``held_out`` operand pairs (5%), which ``split="train"`` never uses, so the arithmetic
figures measure pairs the model has not seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from tokenmill.demo import copying
from tokenmill.demo import tools as tool_data
from tokenmill.demo.words import (
    ANIMALS, GREETING_ANSWERS, GREETINGS, IDENTITY_ANSWERS, IDENTITY_QUESTIONS, ITEMS, NAMES,
    OTHER_CHAT, PLACES, STORY_ADJECTIVES, STORY_ENDINGS, STORY_EVENTS, SYSTEM_PROMPTS, UNKNOWN,
    UNKNOWN_ANSWERS, and_list, story_pronoun)

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

QUESTIONS = {
    "+": ["What is {a} + {b}?", "What's {a} plus {b}?", "{a} + {b} = ?", "Calculate {a} + {b}.",
          "Compute {a}+{b}", "How much is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b}",
          "What is the sum of {a} and {b}?", "what is {a}+{b}", "Please add {a} and {b}.",
          "What do you get if you add {a} and {b}?", "{a} plus {b}?"],
    "-": ["What is {a} - {b}?", "What's {a} minus {b}?", "{a} - {b} = ?", "Calculate {a} - {b}.",
          "Compute {a}-{b}", "How much is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b}",
          "what is {a}-{b}", "What do you get if you take {b} away from {a}?", "{a} minus {b}?"],
    "*": ["What is {a} * {b}?", "What's {a} times {b}?", "{a} x {b} = ?", "Calculate {a} * {b}.",
          "Multiply {a} by {b}.", "What is the product of {a} and {b}?", "{a} * {b}",
          "what is {a}*{b}", "How much is {a} times {b}?"],
}

# Share of each kind in the mix (normalised by ``generate``).
# tool_session carries most tool calls: one long system prompt for several learned calls.
MIX = {"arithmetic": 0.41, "copy": 0.07, "tool_list": 0.04, "word_problem": 0.05, "chat": 0.07,
       "tool_call": 0.06, "tool_answer": 0.02, "tool_session": 0.11, "tool_no_call": 0.02,
       "json": 0.05, "story": 0.03, "chat_story": 0.01}
THINKING_RATE = 0.2      # chat samples with enable_thinking=True
HISTORY_RATE = 0.15      # chat samples with earlier turns in front
SYSTEM_RATE = 0.3        # chat samples with a system prompt


@dataclass
class Sample:
    kind: str
    messages: list[dict]
    completion: str
    tools: list[dict] | None = None
    thinking: bool = False
    meta: dict = field(default_factory=dict)


def held_out(op: str, a: int, b: int) -> bool:
    """The 5% of operand pairs kept out of training (fixed, independent of any seed)."""
    return (a * 7919 + b * 104729 + ord(op) * 31) % 20 == 0


def operands(rng: random.Random, op: str, split: str) -> tuple[int, int]:
    while True:
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 99) if rng.random() < 0.6 else \
                rng.randint(0, 12)
            if rng.random() < 0.5:
                a, b = b, a
        else:
            lo = 10 if rng.random() < 0.85 else 0   # mostly two-digit operands
            a, b = rng.randint(lo, 99), rng.randint(lo, 99)
            if op == "-" and a < b and rng.random() < 0.6:
                a, b = b, a   # mostly non-negative results
        if held_out(op, a, b) == (split == "eval"):
            return a, b


def answer_line(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b} = {OPS[op](a, b)}."


def _worked_add(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    return (f"{a % 10} + {b % 10} = {ones}{', carry 1' if carry else ''}. "
            f"{a // 10} + {b // 10}{' + 1' if carry else ''} = {tens}.")


def _worked_sub(a: int, b: int) -> str:   # a >= b
    # NOTE: the borrow is decided right after both ones digits are written ("2 - 3 needs a
    # borrow"), not before them ("12 - 3"): a model this small then gets it right.
    if a % 10 >= b % 10:
        return f"{a % 10} - {b % 10} = {a % 10 - b % 10}. {a // 10} - {b // 10} = " \
               f"{a // 10 - b // 10}."
    return (f"{a % 10} - {b % 10} needs a borrow: {a % 10 + 10} - {b % 10} = "
            f"{a % 10 + 10 - b % 10}. {a // 10} - 1 - {b // 10} = {a // 10 - 1 - b // 10}.")


def compare(a: int, b: int) -> str:
    """Which of two numbers below 100 is smaller, one digit pair at a time.

    NOTE: without it the model decided "a is smaller" in one step and got it wrong when the
    tens are equal (77 - 78, 89 - 86: most of run 4's subtraction errors); here each step
    compares two digits it copies from the question."""
    def rel(x: int, y: int) -> str:
        return "<" if x < y else ">" if x > y else "="
    ta, tb, oa, ob = a // 10, b // 10, a % 10, b % 10
    tens = f"tens {ta} {rel(ta, tb)} {tb}"
    return tens if ta != tb else f"{tens}, ones {oa} {rel(oa, ob)} {ob}"


def worked_answer(op: str, a: int, b: int) -> str:
    """The answer with its digit-by-digit steps in front, for + and -.

    NOTE: a model this small does not learn to produce a carried or borrowed digit before the
    digits it depends on; written out, each step is one single-digit fact about two digits it
    can copy from the question, and held-out pairs come out right."""
    if op == "+":
        steps = _worked_add(a, b)
    elif op == "-" and a >= b:
        steps = f"{a} - {b}: {compare(a, b)}. {_worked_sub(a, b)}"
    elif op == "-":   # the comparison comes after both numbers, as the borrow does
        steps = f"{a} - {b}: {compare(a, b)}, so {a} is smaller and I compute {b} - {a}. " \
                f"{_worked_sub(b, a)}"
    else:
        return answer_line(op, a, b)
    return f"{steps} So {answer_line(op, a, b)}"


def _column_add(a: int, b: int) -> list[str]:
    ones = a % 10 + b % 10
    steps = [f"Ones: {a % 10} + {b % 10} = {ones}." + (" Write " + str(ones % 10) +
                                                       ", carry 1." if ones >= 10 else "")]
    tens = a // 10 + b // 10 + ones // 10
    steps.append(f"Tens: {a // 10} + {b // 10}" + (" + 1" if ones >= 10 else "") + f" = {tens}.")
    return steps


def _column_sub(a: int, b: int) -> list[str]:
    if a % 10 >= b % 10:
        steps = [f"Ones: {a % 10} - {b % 10} = {a % 10 - b % 10}."]
        tens = f"Tens: {a // 10} - {b // 10} = {a // 10 - b // 10}."
    else:
        steps = [f"Ones: {a % 10} - {b % 10} needs a borrow: "
                 f"{a % 10 + 10} - {b % 10} = {a % 10 + 10 - b % 10}."]
        tens = f"Tens: {a // 10} - 1 - {b // 10} = {a // 10 - 1 - b // 10}."
    return steps + [tens]


def thinking_steps(op: str, a: int, b: int) -> str:
    """The worked steps that go in a <think> block."""
    if op == "+":
        steps = [f"I need to add {a} and {b}."] + _column_add(a, b)
    elif op == "-" and a >= b:
        steps = [f"I need to subtract {b} from {a}.", f"Compare: {compare(a, b)}."] + \
            _column_sub(a, b)
    elif op == "-":
        steps = [f"I need to subtract {b} from {a}.",
                 f"Compare: {compare(a, b)}, so {a} is smaller and the result is negative: "
                 f"I compute {b} - {a} and change the sign."] + _column_sub(b, a) + \
            [f"{b} - {a} = {b - a}."]
    else:
        big, small = (a, b) if a >= b else (b, a)
        steps = [f"I need to multiply {a} by {b}."]
        if big >= 10 and small > 0:
            t, o = big // 10 * 10, big % 10
            steps.append(f"{small} * {t} = {small * t} and {small} * {o} = {small * o}.")
            steps.append(f"{small * t} + {small * o} = {small * big}.")
        else:
            steps.append(f"{small} * {big} = {small * big}.")
    return "\n".join(steps + [f"So {a} {op} {b} = {OPS[op](a, b)}."])


def think(text: str) -> str:
    return f"<think>\n{text}\n</think>\n\n"


def arithmetic(rng: random.Random, split: str) -> Sample:
    # Subtraction (borrows) is the hardest of the three for a model this small.
    op = rng.choices("+-*", weights=[0.4, 0.45, 0.15])[0]
    a, b = operands(rng, op, split)
    q = rng.choice(QUESTIONS[op]).format(a=a, b=b)
    return Sample("arithmetic", [{"role": "user", "content": q}], worked_answer(op, a, b),
                  meta={"op": op, "a": a, "b": b, "answer": OPS[op](a, b),
                        "steps": thinking_steps(op, a, b), "short": answer_line(op, a, b)})


def word_problem(rng: random.Random, split: str) -> Sample:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choices("+-*", weights=[0.4, 0.4, 0.2])[0]
    while True:
        a, b = operands(rng, op, split)
        if op != "-" or a >= b:
            break
    c = OPS[op](a, b)
    if op == "+":
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        ans = f"{a} + {b} = {c}, so {name} has {c} {item}."
    elif op == "-":
        q = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
        ans = f"{a} - {b} = {c}, so {name} has {c} {item} left."
    else:
        q = f"There are {a} boxes with {b} {item} in each. How many {item} are there in all?"
        ans = f"{a} * {b} = {c}, so there are {c} {item}."
    return Sample("word_problem", [{"role": "user", "content": q}], ans,
                  meta={"op": op, "a": a, "b": b, "answer": c,
                        "steps": thinking_steps(op, a, b)})


def chat(rng: random.Random, split: str) -> Sample:
    r = rng.random()
    if r < 0.35:
        q, ans, sub = rng.choice(GREETINGS), rng.choice(GREETING_ANSWERS), "greeting"
    elif r < 0.65:
        q, ans, sub = rng.choice(IDENTITY_QUESTIONS), rng.choice(IDENTITY_ANSWERS), "identity"
    elif r < 0.85:
        q, ans = rng.choice(OTHER_CHAT)
        sub = "other"
    else:
        q, ans, sub = rng.choice(UNKNOWN), rng.choice(UNKNOWN_ANSWERS), "unknown"
    if rng.random() < 0.15:
        q = q.lower()
    steps = {"greeting": "The user greets me. I greet them back and say what I can do.",
             "identity": "The user asks about me. I am the tokenmill demo model.",
             "other": "The user is chatting. I answer briefly and kindly.",
             "unknown": "I do not know this; I only know arithmetic, tools, JSON and "
                        "stories. I say so."}[sub]
    return Sample("chat", [{"role": "user", "content": q}], ans,
                  meta={"sub": sub, "steps": steps})


def story(rng: random.Random) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    he, his = story_pronoun(rng)
    opening = rng.choice(["Once upon a time, there was", "Long ago, there lived",
                          "One day, there was", "In a land far away, there lived"])
    lines = [f"{opening} a {rng.choice(STORY_ADJECTIVES)} {animal} named {name}.",
             f"{name} lived in {place}."]
    for event in rng.sample(STORY_EVENTS, 2):
        lines.append(event.format(name=name, he=he, his=his, He=he.capitalize(),
                                  His=his.capitalize()))
    lines.append(rng.choice(STORY_ENDINGS).format(name=name, he=he, his=his))
    return " ".join(lines)


def story_sample(rng: random.Random, split: str) -> Sample:
    return Sample("story", [], story(rng))


def chat_story(rng: random.Random, split: str) -> Sample:
    q = rng.choice(["Tell me a story.", "Can you tell me a short story?", "Write a story.",
                    "Tell me a story about an animal.", "I want a bedtime story."])
    return Sample("chat_story", [{"role": "user", "content": q}], story(rng),
                  meta={"steps": "The user wants a short story. I tell one about an animal."})


JSON_KEYS = [("a", "b"), ("x", "y"), ("first", "second"), ("result", "check"),
             ("left", "right")]


def json_answer(rng: random.Random, split: str) -> Sample:
    r = rng.random()
    if r < 0.15:
        a, b = operands(rng, "+", split)
        while split == "train" and held_out("-", a, b):
            a, b = operands(rng, "+", split)
        q = rng.choice(["Give the sum and the difference of {a} and {b}. Answer in JSON with "
                        "keys sum and difference.",
                        "Answer in JSON with keys sum and difference for {a} and {b}."])
        q = q.format(a=a, b=b)
        obj = {"sum": a + b, "difference": a - b}
        steps = f"{a} + {b} = {a + b}.\n{a} - {b} = {a - b}."
    elif r < 0.5:
        k1, k2 = rng.choice(JSON_KEYS)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        (a, b), (c, d) = operands(rng, op1, split), operands(rng, op2, split)
        q = rng.choice([
            "Compute {e1} and {e2}. Answer in JSON with keys {k1} and {k2}.",
            "Answer in JSON with keys {k1} and {k2}: {k1} is {e1}, {k2} is {e2}.",
            "What are {e1} and {e2}? Reply with a JSON object with keys {k1} and {k2}."])
        q = q.format(e1=f"{a} {op1} {b}", e2=f"{c} {op2} {d}", k1=k1, k2=k2)
        obj = {k1: OPS[op1](a, b), k2: OPS[op2](c, d)}
        steps = f"{a} {op1} {b} = {obj[k1]}.\n{c} {op2} {d} = {obj[k2]}."
    else:
        name, city, age = rng.choice(NAMES), tool_data.place(rng, split), rng.randint(3, 99)
        fields = {"name": name, "age": age, "city": city}
        keys = rng.sample(list(fields), rng.choice([2, 3]))
        text = rng.choice(["{name} is {age} years old and lives in {city}.",
                           "{name} lives in {city} and is {age}.",
                           "My friend {name}, age {age}, comes from {city}."]).format(**fields)
        keys_text = and_list(keys)
        q = rng.choice(["Extract the details from this text: \"{t}\" Answer in JSON with keys {k}.",
                        "{t} Answer in JSON with keys {k}.",
                        "Read this: {t}\nReturn JSON with keys {k}."]).format(t=text, k=keys_text)
        obj = {k: fields[k] for k in keys}
        steps = "The user wants JSON with keys " + keys_text + ". I take the values from the text."
    return Sample("json", [{"role": "user", "content": q}], json.dumps(obj),
                  meta={"json": obj, "steps": steps})


def tool_call(rng: random.Random, split: str) -> Sample:
    messages, completion, tools, meta = tool_data.tool_call(rng, split)
    return Sample("tool_call", messages, completion, tools=tools, meta=meta)


def tool_answer(rng: random.Random, split: str) -> Sample:
    messages, completion, tools, meta = tool_data.tool_answer(rng, split)
    return Sample("tool_answer", messages, completion, tools=tools, meta=meta)


def tool_session(rng: random.Random, split: str) -> Sample:
    messages, completion, tools, meta = tool_data.tool_session(rng, split)
    return Sample("tool_session", messages, completion, tools=tools, meta=meta)


def tool_list(rng: random.Random, split: str) -> Sample:
    tools, q, answer, meta = tool_data.tool_list(rng, split)
    return Sample("tool_list", [{"role": "user", "content": q}], answer, tools=tools, meta=meta)


def tool_no_call(rng: random.Random, split: str) -> Sample:
    """Tools are listed but the question needs none of them: answer directly."""
    base = arithmetic(rng, split) if rng.random() < 0.5 else chat(rng, split)
    base.kind, base.tools = "tool_no_call", tool_data.tools_without_calculator(rng, split)
    return base


def copy_drill(rng: random.Random, split: str) -> Sample:
    messages, answer, meta = copying.copy_drill(rng)
    return Sample("copy", messages, answer, meta=meta)


KINDS = {"copy": copy_drill, "arithmetic": arithmetic, "word_problem": word_problem, "chat": chat,
         "tool_call": tool_call, "tool_answer": tool_answer, "tool_session": tool_session,
         "tool_no_call": tool_no_call, "tool_list": tool_list,
         "json": json_answer, "story": story_sample, "chat_story": chat_story}


def _history(rng: random.Random, split: str) -> list[dict]:
    """One or two earlier exchanges (learned too: see ``train.encode``)."""
    out = []
    for _ in range(rng.choice([1, 1, 2])):
        s = rng.choice([arithmetic, chat, word_problem])(rng, split)
        out += s.messages + [{"role": "assistant", "content": s.completion}]
    return out


def _decorate(rng: random.Random, s: Sample, split: str) -> Sample:
    """System prompt, earlier turns and thinking, on top of a chat sample."""
    if s.kind == "story":
        return s
    own_system = bool(s.messages) and s.messages[0]["role"] == "system"
    if s.kind.startswith("tool") or own_system or rng.random() >= HISTORY_RATE:
        history = []
    else:
        history = _history(rng, split)
    system = []
    if not own_system and rng.random() < SYSTEM_RATE:
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    s.messages = system + history + s.messages
    if rng.random() < THINKING_RATE:
        s.thinking = True
        # The <think> block has done the working; the answer after it is the short one.
        s.completion = think(s.meta.get("steps", "I answer directly.")) + \
            s.meta.get("short", s.completion)
    return s


def generate(n: int, seed: int = 0, split: str = "train",
             kinds: dict[str, float] | None = None) -> list[Sample]:
    """``n`` samples, deterministic in (n, seed, split, kinds)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    mix = kinds or MIX
    rng = random.Random(f"{seed}-{split}")
    names, weights = list(mix), list(mix.values())
    out = []
    for _ in range(n):
        kind = rng.choices(names, weights=weights)[0]
        out.append(_decorate(rng, KINDS[kind](rng, split), split))
    return out
