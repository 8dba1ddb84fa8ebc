"""`tokenmill bench serve` end to end against the real server on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _server import REPO, server_env, start_server


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama) as srv:
        yield srv


def bench(server, tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", server.url,
           "--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "8",
           "--ignore-eos", "--no-progress", "--result-file", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=server_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Output token throughput" in proc.stdout
    return json.loads(out.read_text())


def test_random_completions(server, tmp_path):
    r = bench(server, tmp_path, "--max-concurrency", "3", "--vocab-size", "500")
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["total_output_tokens"] == 6 * 8  # ignore_eos: every request runs to max_tokens
    assert r["total_input_tokens"] == 6 * 16  # token-id prompts: exact lengths
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "mean_itl_ms", "median_e2el_ms"):
        assert r[key] > 0, key
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    assert len(r["ttfts"]) == 6


def test_shared_prefix_chat_with_tokenizer(server, tmp_path, tiny_llama):
    r = bench(server, tmp_path, "--endpoint", "chat", "--dataset", "shared-prefix",
              "--shared-prefix-len", "64", "--tokenizer", tiny_llama, "--request-rate", "20",
              "--random-range-ratio", "0.5")
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["total_output_tokens"] >= 6 * 4
