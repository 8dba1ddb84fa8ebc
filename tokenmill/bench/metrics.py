"""Serving-benchmark arithmetic: per-request timings -> TTFT, TPOT, ITL, throughput.

Kept free of I/O so it is unit-tested on synthetic timings. Definitions follow vLLM's
``bench serve``: TTFT = first token time - send time; TPOT = (e2e - TTFT) / (output tokens - 1)
for requests with more than one output token; ITL = the gaps between successive streamed chunks
(a chunk of k tokens counts as one gap); E2EL = last token time - send time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    send_time: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end_time: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_time is not None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2el(self) -> float:
        return self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(name: str, values_s: list[float], out: dict) -> None:
    ms = [v * 1000 for v in values_s]
    out[f"mean_{name}_ms"] = sum(ms) / len(ms) if ms else math.nan
    out[f"median_{name}_ms"] = percentile(ms, 50)
    out[f"std_{name}_ms"] = (math.sqrt(sum((v - out[f"mean_{name}_ms"]) ** 2 for v in ms)
                                       / len(ms)) if ms else math.nan)
    for p in (90, 99):
        out[f"p{p}_{name}_ms"] = percentile(ms, p)


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """The result dict, keys named like vLLM's bench serve."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    result = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": [r.error for r in records if r.error][:10],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s
        if duration_s > 0 else math.nan,
    }
    _stats("ttft", [r.ttft for r in ok], result)
    _stats("tpot", [t for r in ok if (t := r.tpot) is not None], result)
    _stats("itl", [g for r in ok for g in r.itls], result)
    _stats("e2el", [r.e2el for r in ok], result)
    return result
