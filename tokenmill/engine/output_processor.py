"""Front-end side of a request: prompt in, text out.

``InputProcessor`` tokenizes and validates a prompt and fans ``n > 1`` out into child requests
(``"{i}_{request_id}"``) for the core. ``OutputProcessor`` turns the core's token-level
``EngineCoreOutput``s back into ``RequestOutput``s: incremental detokenization, stop strings
(which finish a request here and must be aborted in the core), logprobs with decoded tokens,
and fan-in of the children. Both are used by the offline engine and by ``AsyncLLM`` alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from tokenmill.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from tokenmill.engine.interfaces import EngineCoreOutput, EngineCoreRequest, TokenLogprobs
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | dict  # "text" or {"prompt_token_ids": [...]} or {"prompt": "text"}


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, eos_token_ids: list[int],
                 vocab_size: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenize(prompt["prompt"])
        raise ValueError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got "
                         f"{type(prompt).__name__}")

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                priority: int = 0, arrival_time: float | None = None
                ) -> tuple[str | None, list[int], list[EngineCoreRequest]]:
        text, ids = self.tokenize(prompt)
        self.validate(ids)
        self.validate_params(params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child = params.clone(n=1, seed=seed)
            rid = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(EngineCoreRequest(rid, ids, child, self.eos_token_ids, priority,
                                              arrival))
        return text, ids, children

    def validate_params(self, params: SamplingParams) -> None:
        """Reject what the core would choke on: wrong types (a Struct does not check them on
        construction) and token ids outside the vocabulary."""
        try:
            msgspec.convert(msgspec.to_builtins(params), SamplingParams)
        except (msgspec.ValidationError, TypeError, OverflowError) as e:
            raise ValueError(f"invalid sampling parameters: {e}") from None
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is out of vocabulary "
                                 f"(size {self.vocab_size})")

    def validate(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but this model's maximum "
                             f"context length is {self.max_model_len} tokens (the prompt must "
                             f"leave room for at least one generated token)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of vocabulary (size {self.vocab_size})")


@dataclass
class _Child:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0


class _Parent:
    """One user request: its children (n of them), and where its outputs go."""

    def __init__(self, request_id, prompt, prompt_ids, params, sink, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.children: dict[str, _Child] = {}
        self.prompt_logprobs = None
        self.num_cached_tokens = 0
        self.metrics = {"arrival_time": arrival, "first_token_time": None,
                        "last_token_time": None, "num_generation_tokens": 0,
                        "queue_time": None, "inter_token_latencies": []}

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, _Parent] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                    params: SamplingParams, children: list[EngineCoreRequest],
                    sink: Callable[[RequestOutput], Any] | None = None,
                    arrival: float | None = None) -> None:
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already running")
        parent = _Parent(request_id, prompt, prompt_ids, params, sink,
                         time.monotonic() if arrival is None else arrival)
        for i, child in enumerate(children):
            detok = None
            if child.params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, child.params)
            want_lp = child.params.logprobs is not None
            parent.children[child.request_id] = _Child(
                i, child.params, detok, logprobs=[] if want_lp else None,
                cumulative_logprob=0.0 if want_lp else None)
            self._child_to_parent[child.request_id] = parent
        self._parents[request_id] = parent

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return list(parent.children) if parent else []

    def abort(self, request_id: str) -> list[str]:
        """Forget a request (client gone); returns the child ids to abort in the core."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        for cid in parent.children:
            self._child_to_parent.pop(cid, None)
        return [cid for cid, c in parent.children.items() if c.finish_reason is None]

    def process(self, outputs: list[EngineCoreOutput]
                ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to report and the child ids the core must abort."""
        ready: list[RequestOutput] = []
        to_abort: list[str] = []
        now = time.monotonic()
        for out in outputs:
            parent = self._child_to_parent.get(out.request_id)
            if parent is None:
                continue  # aborted meanwhile
            child = parent.children[out.request_id]
            if child.finish_reason is not None:
                continue  # ended by a stop string here; the core has not seen the abort yet
            self._update_child(parent, child, out, now)
            if child.finish_reason is not None and not out.finished:
                to_abort.append(out.request_id)  # a stop string ended it here
            result = self._make_output(parent, child)
            if parent.finished:
                del self._parents[parent.request_id]
                for cid in parent.children:
                    self._child_to_parent.pop(cid, None)
            if result is not None:
                if parent.sink is not None:
                    parent.sink(result)
                ready.append(result)
        return ready, to_abort

    def _update_child(self, parent: _Parent, child: _Child, out: EngineCoreOutput, now: float):
        m = parent.metrics
        if out.new_token_ids:
            if m["first_token_time"] is None:
                m["first_token_time"] = now
            else:
                m["inter_token_latencies"].append(now - m["last_token_time"])
            m["last_token_time"] = now
            m["num_generation_tokens"] += len(out.new_token_ids)
        if out.queue_time is not None and m["queue_time"] is None:
            m["queue_time"] = out.queue_time
        if out.prompt_logprobs is not None:
            parent.prompt_logprobs = [None] + [self._logprob_dict(p)
                                               for p in out.prompt_logprobs]
        parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
        child.token_ids.extend(out.new_token_ids)
        if child.logprobs is not None and out.new_logprobs:
            for lp in out.new_logprobs:
                child.logprobs.append(self._logprob_dict(lp))
                child.cumulative_logprob += lp.logprobs[0]
        if out.finished:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        if child.detok is not None:
            # A stop token's text is left out (unless include_stop_str_in_output), as in vLLM.
            stop_token = out.finish_reason == "stop" and out.stop_reason is not None
            stop = child.detok.update(out.new_token_ids, stop_terminated=stop_token)
            if stop is not None:
                child.finish_reason, child.stop_reason = "stop", stop

    def _logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        texts = decode_logprob_tokens(self.tokenizer, lp.token_ids) if self.tokenizer else \
            [None] * len(lp.token_ids)
        d: dict[int, Logprob] = {lp.token_ids[0]: Logprob(lp.logprobs[0], lp.rank, texts[0])}
        for rank, (tid, val, txt) in enumerate(zip(lp.token_ids[1:], lp.logprobs[1:], texts[1:]),
                                               start=1):
            d.setdefault(tid, Logprob(val, rank, txt))
        return d

    def _make_output(self, parent: _Parent, changed: _Child) -> RequestOutput | None:
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not parent.finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        kids = [changed] if delta else sorted(parent.children.values(), key=lambda c: c.index)
        completions = [self._completion(c, delta) for c in kids]
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_ids,
            outputs=completions, finished=parent.finished,
            prompt_logprobs=parent.prompt_logprobs, num_cached_tokens=parent.num_cached_tokens,
            metrics=dict(parent.metrics))

    def _completion(self, c: _Child, delta: bool) -> CompletionOutput:
        finished = c.finish_reason is not None
        text = c.detok.get_next_output_text(finished, delta) if c.detok is not None else ""
        start = c.sent_tokens if delta else 0
        ids = c.token_ids[start:]
        lps = c.logprobs[start:] if c.logprobs is not None else None
        if delta:
            c.sent_tokens = len(c.token_ids)
        return CompletionOutput(c.index, text, ids, c.cumulative_logprob, lps, c.finish_reason,
                                c.stop_reason)
