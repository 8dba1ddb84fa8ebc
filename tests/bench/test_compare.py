"""`tokenmill bench compare`: the roofline arithmetic, the report, the wide benchmark
tokenizer, and one end-to-end run on a tiny model (tokenmill and transformers; llama-server
needs a ~5 minute build, so that peer is skipped here and measured in BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from transformers import Qwen2Config

from tokenmill.bench.compare import (_dataset, _seed, markdown, median_run, plot, ratios,
                                     variants)
from tokenmill.bench.roofline import Machine, ModelCost, bounds

QWEN_05B = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                       tie_word_embeddings=True)


def test_model_cost_of_the_qwen2_5_0_5b_shape():
    cost = ModelCost.from_config(QWEN_05B)
    per_layer = 896 * 896 * 2 + 896 * 128 * 2 + 3 * 896 * 4864
    assert cost.matmul_params == 24 * per_layer + 896 * 151936 == 493_961_216
    assert cost.head_params == 896 * 151936
    assert cost.weight_bytes == 2 * cost.matmul_params          # tied: lm_head is the embedding
    assert cost.attn_flops_per_ctx == 24 * 4 * 14 * 64


def test_bounds_are_the_flops_and_bytes_over_the_rates():
    cost = ModelCost(matmul_params=1_000_000, head_params=250_000, weight_bytes=2_000_000,
                     attn_flops_per_ctx=0)
    b = bounds(cost, Machine(gemm_gflops=100.0, copy_gbps=40.0), input_len=100, output_len=100)
    # 100 prompt tokens x 1.5 MFLOP (no lm_head) + 100 outputs x 2 MFLOP = 0.35 GFLOP per
    # request -> 3.5 ms at 100 GFLOP/s, for 100 outputs
    assert b["large_batch_out_tok_s"] == pytest.approx(100 / 0.0035)
    assert b["batch1_out_tok_s"] == pytest.approx(40e9 / 2e6)


def test_the_bound_takes_each_rate_at_its_best():
    slow = Machine(gemm_gflops=370.0, copy_gbps=23.0, amx_gemm_gflops=370.0)
    fast = Machine(gemm_gflops=900.0, copy_gbps=18.0, amx_gemm_gflops=900.0)
    assert Machine.best(slow, fast) == Machine(gemm_gflops=900.0, copy_gbps=23.0,
                                               amx_gemm_gflops=900.0)


def _report():
    return {"concurrency": [1, 4], "machine": {"gemm_gflops": 150.0, "copy_gbps": 40.0,
                                               "bf16_gemm_gflops": 150.0,
                                               "fp32_gemm_gflops": 120.0},
            "roofline": {"large_batch_out_tok_s": 200.0, "batch1_out_tok_s": 40.0},
            "results": {
                "tokenmill": {1: {"output_throughput": 30.0, "mean_ttft_ms": 100.0,
                                  "mean_tpot_ms": 30.0},
                              4: {"output_throughput": 100.0, "mean_ttft_ms": 200.0,
                                  "mean_tpot_ms": 35.0}},
                "llama-server": {1: {"output_throughput": 40.0, "mean_ttft_ms": 80.0,
                                     "mean_tpot_ms": 25.0}},
                "transformers": {4: {"output_throughput": 25.0}}},
            "skipped": {"vllm": "not installed"}}


def test_ratios_and_markdown():
    report = _report()
    report["ratios"] = ratios(report)
    assert report["ratios"][1] == {"roofline_share": 0.15, "over_llama-server": 0.75}
    assert report["ratios"][4] == {"roofline_share": 0.5, "over_transformers": 4.0}
    table = markdown(report)
    assert "| 1 | tokenmill | 30.0 | 100 | 30.0 |" in table
    assert "| 4 | transformers | 25.0 | - | - |" in table
    assert "| 1 | 0.75x | - | 15% |" in table and "| 4 | - | 4.00x | 50% |" in table
    assert "Skipped vllm: not installed" in table


def test_plot_of_a_report_read_back_from_json(tmp_path):
    """A saved report has str concurrency keys: the plot still puts each point at its number
    of clients, in order (it once drew them as categories)."""
    import matplotlib.pyplot as plt
    report = json.loads(json.dumps({**_report(), "model": "m", "dtype": "bfloat16",
                                    "input_len": 128, "output_len": 128}))
    report["results"]["tokenmill"]["16"] = {"output_throughput": 90.0}
    assert plot(report, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size
    lines = {ln.get_label(): ln for ln in plt.gcf().axes[0].lines}
    assert list(lines["tokenmill"].get_xdata()) == [1, 4, 16]
    assert list(lines["tokenmill"].get_ydata()) == [30.0, 100.0, 90.0]
    plt.close("all")


def test_warm_up_levels_and_shared_prefix_draw_different_prompts():
    # A warm-up prompt that comes back in a level is answered from the servers' prompt caches
    # (seed -1 and seed 1 are one seed to random.Random: that happened at batch 1).
    args = argparse.Namespace(seed=0, input_len=8, output_len=4, shared_prefix_len=16)
    seeds = [_seed(args, p) for p in ("warm-up", "level-1/0", "level-1/1", "shared-prefix")]
    assert len(set(seeds)) == 4
    prompts = [tuple(r.prompt) for s in seeds for r in _dataset(args, 1000, 4, s)]
    assert len(set(prompts)) == len(prompts) == 16
    again = _dataset(args, 1000, 4, seeds[0])   # a seed draws the same prompts every time
    assert again[0].prompt == _dataset(args, 1000, 4, seeds[0])[0].prompt


def test_variants_parse_names_and_flags():
    assert variants(["chunk512=--max-num-batched-tokens 512", "plain="]) == [
        ("chunk512", ("--max-num-batched-tokens", "512")), ("plain", ())]
    for bad in (["noflags"], ["=--x 1"], ["a b=--x"], ["a=--x", "a=--y"]):
        with pytest.raises(ValueError, match="NAME=FLAGS"):
            variants(bad)


def test_a_variant_gets_its_own_ratio_column():
    report = _report()
    report["results"]["tokenmill-chunk512"] = {4: {"output_throughput": 80.0}}
    report["ratios"] = ratios(report)
    assert report["ratios"][4]["over_tokenmill-chunk512"] == 1.25
    table = markdown(report)
    assert "| tokenmill / llama-server | tokenmill / transformers | tokenmill / " \
           "tokenmill-chunk512 | share" in table
    assert "| 4 | - | 4.00x | 1.25x | 50% |" in table


def test_a_level_reports_its_median_run():
    runs = [{"output_throughput": t, "mean_ttft_ms": t * 10} for t in (30.0, 10.0, 20.0)]
    assert median_run(runs) == {"output_throughput": 20.0, "mean_ttft_ms": 200.0,
                                "runs_output_throughput": [30.0, 10.0, 20.0]}
    assert median_run(runs[:2])["output_throughput"] == 10.0   # the lower middle of an even count


def test_wide_tokenizer_decodes_every_id_and_keeps_real_text():
    from tokenmill.testing.checkpoints import make_tokenizer

    small, wide = make_tokenizer(), make_tokenizer(3000)
    assert len(wide) == 3000
    assert all(wide.decode([i]) for i in range(len(small), 3000))
    text = "The quick brown fox jumps over the lazy dog. 12345"
    assert wide(text).input_ids == small(text).input_ids


@pytest.mark.timeout(300)
def test_compare_end_to_end_on_a_tiny_model(tiny_llama, tmp_path):
    result, table, png = tmp_path / "r.json", tmp_path / "t.md", tmp_path / "p.png"
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "compare", "--model", tiny_llama,
           "--dtype", "float32", "--concurrency", "1", "4", "--input-len", "16",
           "--output-len", "8", "--min-prompts", "4", "--repeats", "2",
           "--shared-prefix-len", "64", "--shared-prefix-prompts", "3",
           "--tokenmill-variant", "chunked=--max-num-batched-tokens 8",
           "--skip", "llama-server", "--work-dir", str(tmp_path / "work"),
           "--result-file", str(result), "--markdown", str(table), "--plot", str(png)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(result.read_text())
    for peer in ("tokenmill", "tokenmill-chunked", "transformers"):
        assert set(report["results"][peer]) == {"1", "4"}
        assert all(v["output_throughput"] > 0 for v in report["results"][peer].values())
    for c, v in report["results"]["tokenmill"].items():
        assert (v["failed"], v["completed"]) == (0, {"1": 4, "4": 8}[c])
        assert len(v["runs_output_throughput"]) == 2
        assert v["output_throughput"] == min(v["runs_output_throughput"])
    assert report["roofline"]["large_batch_out_tok_s"] > 0
    sp = report["shared_prefix"]
    assert sp["on"]["completed"] == 2
    assert sp["ttft_off_over_on"] == sp["off"]["median_ttft_ms"] / sp["on"]["median_ttft_ms"]
    assert "median TTFT" in table.read_text()
    assert "| 4 | tokenmill |" in table.read_text()
    assert "| 4 | tokenmill-chunked |" in table.read_text()
    assert (tmp_path / "work" / "tokenmill-chunked.log").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
