"""bench serve's arithmetic on synthetic timings (numbers worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.metrics import RequestRecord, percentile, summarize


def rec(send, chunks, out_tokens, prompt=10, end=None):
    return RequestRecord(send_time=send, prompt_tokens=prompt, output_tokens=out_tokens,
                         chunk_times=chunks, end_time=chunks[-1] if end is None else end)


def test_per_request_timings():
    r = rec(1.0, [1.5, 1.7, 2.0, 2.5], out_tokens=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.5)
    assert r.itls == pytest.approx([0.2, 0.3, 0.5])
    assert r.tpot == pytest.approx((2.5 - 1.5) / 3)
    assert rec(0.0, [0.4], out_tokens=1).tpot is None  # one token: no per-output-token time


def test_chunk_of_several_tokens_counts_once_in_itl_but_fully_in_tpot():
    r = rec(0.0, [1.0, 2.0], out_tokens=5)  # second chunk carried 4 tokens
    assert r.itls == pytest.approx([1.0])
    assert r.tpot == pytest.approx(1.0 / 4)


@pytest.mark.parametrize("p", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(p):
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert math.isnan(percentile([], 50))


def test_summary_throughput_and_latency_stats():
    records = [rec(0.0, [0.1, 0.2, 0.3], out_tokens=3, prompt=4),
               rec(0.0, [0.3, 0.5], out_tokens=2, prompt=6),
               RequestRecord(send_time=0.0, error="HTTP 500")]
    s = summarize(records, duration_s=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500"]
    assert s["total_input_tokens"] == 10 and s["total_output_tokens"] == 5
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(7.5)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 200 * 0.99)
    assert s["mean_tpot_ms"] == pytest.approx((100.0 + 200.0) / 2)
    assert s["mean_itl_ms"] == pytest.approx((100 + 100 + 200) / 3)
    assert s["mean_e2el_ms"] == pytest.approx(400.0)
