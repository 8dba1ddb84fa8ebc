"""Evaluate the demo model through the real server, with the openai SDK, at temperature 0.

    nice -n 19 python -m tokenmill.demo.evaluate                 # the embedded default model
    nice -n 19 python -m tokenmill.demo.evaluate --model PATH    # or a folder

Starts ``python -m tokenmill.cli serve [PATH]`` on a free loopback port (no PATH: the embedded
default), asks freshly generated held-out questions (``data.generate(split="eval")``, another
seed than training; arithmetic operand pairs training never saw) and prints one JSON object of
figures. Then checks that transformers, on the same folder, gives the same greedy text as the
server on a few prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenmill.bench.peers import TokenmillPeer
from tokenmill.demo import data
from tokenmill.demo import tools as tool_data

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
NUMBER_RE = re.compile(r"-?\d+")
PER_KIND = {"arithmetic": 600, "word_problem": 60, "chat": 60, "tool_call": 200,
            "tool_answer": 150, "tool_no_call": 60, "json": 100}


def split_thinking(text: str) -> tuple[str | None, str]:
    """(the <think> block's text or None, the answer after it)."""
    if "</think>" in text:
        head, _, tail = text.partition("</think>")
        return head.replace("<think>", "").strip(), tail.strip()
    return None, text.strip()


def parse_tool_call(message) -> dict | None:
    """The first tool call, from ``tool_calls`` (a tool parser) or ``<tool_call>`` text."""
    if getattr(message, "tool_calls", None):
        fn = message.tool_calls[0].function
        try:
            return {"name": fn.name, "arguments": json.loads(fn.arguments)}
        except (TypeError, ValueError):
            return None
    m = TOOL_CALL_RE.search(message.content or "")
    if not m:
        return None
    try:
        call = json.loads(m.group(1))
    except ValueError:
        return None
    ok = isinstance(call, dict) and isinstance(call.get("name"), str) and \
        isinstance(call.get("arguments"), dict)
    return call if ok else None


def last_number(text: str) -> int | None:
    nums = NUMBER_RE.findall(text.replace(",", ""))
    return int(nums[-1]) if nums else None


def grade(s: data.Sample, message) -> dict[str, bool]:
    """Named pass/fail checks of one answer."""
    text = message.content or ""
    thought, answer = split_thinking(text)
    checks = {}
    if s.thinking:
        checks["thinking_block"] = text.lstrip().startswith("<think>") and thought is not None
    if s.kind in ("arithmetic", "word_problem") or s.kind == "tool_no_call" and "answer" in s.meta:
        ok = last_number(answer) == s.meta["answer"]
        if s.kind == "arithmetic":
            two_digit = s.meta["a"] >= 10 and s.meta["b"] >= 10
            op = {"+": "add", "-": "sub", "*": "mul"}[s.meta["op"]]
            checks[f"{op}{'_2digit' if two_digit and op != 'mul' else ''}"] = ok
        else:
            checks[s.kind] = ok
    if s.kind == "tool_no_call":
        checks["no_tool_call_when_not_needed"] = parse_tool_call(message) is None and \
            "<tool_call>" not in text
    if s.kind == "tool_call":
        call = parse_tool_call(message)
        checks["tool_call_valid"] = call is not None
        checks["tool_call_correct"] = call is not None and call["name"] == s.meta["tool"] and \
            call["arguments"] == s.meta["arguments"]
    if s.kind == "tool_answer":
        checks["answer_uses_tool_result"] = "<tool_call>" not in answer and all(
            m.lower() in answer.lower() for m in s.meta["mentions"])
    if s.kind == "json":
        try:
            obj = json.loads(answer)
            checks["json_valid"] = isinstance(obj, dict)
        except ValueError:
            obj, checks["json_valid"] = None, False
        checks["json_correct"] = obj == s.meta["json"]
    if s.kind in ("chat", "tool_no_call") and s.meta.get("sub") in ("greeting", "identity"):
        checks["greeting_sensible"] = "tokenmill demo model" in answer and \
            "<tool_call>" not in answer
    return checks


def ask(client, model: str, s: data.Sample):
    extra = {"chat_template_kwargs": {"enable_thinking": True}} if s.thinking else None
    r = client.chat.completions.create(model=model, messages=s.messages, tools=s.tools,
                                       temperature=0, max_tokens=300, extra_body=extra)
    return r.choices[0].message


def eval_chat(client, model: str, seed: int, scale: float, workers: int):
    """Figures per check (fraction passed, count) and a few failures to look at."""
    samples = []
    for i, (kind, n) in enumerate(PER_KIND.items()):
        samples += data.generate(max(1, int(n * scale)), seed=seed + 1000 * i, split="eval",
                                 kinds={kind: 1.0})
    with ThreadPoolExecutor(workers) as pool:
        messages = list(pool.map(lambda s: ask(client, model, s), samples))
    totals: dict[str, list[int]] = {}
    failures = []
    for s, m in zip(samples, messages):
        for name, ok in grade(s, m).items():
            t = totals.setdefault(name, [0, 0])
            t[0] += ok
            t[1] += 1
            if not ok and len(failures) < 25:
                failures.append({"check": name, "messages": s.messages[-1]["content"][:200],
                                 "got": (m.content or "")[:300]})
    return {k: {"score": round(p / n, 4), "n": n} for k, (p, n) in sorted(totals.items())}, failures


def eval_stories(client, model: str, seed: int, n: int) -> dict:
    """Plain completions (no chat template) of story openings: they end with "The end."."""
    rng = random.Random(seed)
    ok = 0
    for _ in range(n):
        prompt = " ".join(data.story(rng).split(" ")[:rng.randint(3, 12)])
        r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=160)
        ok += r.choices[0].text.strip().endswith("The end.") and \
            r.choices[0].finish_reason == "stop"
    return {"score": round(ok / n, 4), "n": n}


PARITY_PROMPTS = [
    [{"role": "user", "content": "What is 37 + 48?"}],
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What is 91 - 57?"}],
    [{"role": "user", "content": "Alice is 31 years old and lives in Oslo. Answer in JSON with "
                                 "keys name and age."}],
]


def parity(client, model: str, folder: str) -> dict:
    """Same greedy text from transformers and from the server, on chat and plain prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                              dtype=torch.float32).eval()
    weather = tool_data.weather_tool(random.Random(0), "eval")[0]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in PARITY_PROMPTS]
    texts.append(tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}],
                                         tools=[weather], tokenize=False,
                                         add_generation_prompt=True))
    texts.append(tok.apply_chat_template(PARITY_PROMPTS[0], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True))
    texts.append("Once upon a time, there was a little fox")
    same, diffs = 0, []
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=120, do_sample=False)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = client.completions.create(model=model, prompt=text, temperature=0,
                                        max_tokens=120).choices[0].text
        same += got == want
        if got != want:
            diffs.append({"prompt": text[-80:], "tokenmill": got, "transformers": want})
    return {"same": same, "n": len(texts), "diffs": diffs}


def main(argv=None) -> int:
    from openai import OpenAI

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded one)")
    ap.add_argument("--seed", type=int, default=12345, help="held-out data seed")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the question counts")
    ap.add_argument("--workers", type=int, default=16, help="concurrent requests")
    ap.add_argument("--show-failures", action="store_true")
    args = ap.parse_args(argv)

    from tokenmill.cli import default_model_path

    folder = args.model or default_model_path()
    t0 = time.time()
    with TokenmillPeer(Path(tempfile.mkdtemp()), args.model) as url:
        startup = time.time() - t0
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
        model = client.models.list().data[0].id
        t0 = time.time()
        figures, failures = eval_chat(client, model, args.seed, args.scale, args.workers)
        figures["story_completion_ends"] = eval_stories(client, model, args.seed,
                                                        max(1, int(20 * args.scale)))
        result = {"model": folder, "server_startup_s": round(startup, 1),
                  "eval_seconds": round(time.time() - t0), "figures": figures,
                  "parity_with_transformers": parity(client, model, folder)}
    if args.show_failures:
        result["failures"] = failures
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
