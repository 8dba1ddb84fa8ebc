"""The one-call native decoder stack (models/native_decode.py, csrc/decode_layers.c).

It must be the per-op path's schedule, not an approximation of it: on every decode step of a
real engine run, its hidden states must equal the Python layers' bit for bit, for each family's
switches (q/k/v bias, Qwen3's q/k norm, a sliding window, head_dim 16 and 32), and it must step
aside for steps it does not serve."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.testing.checkpoints import make_checkpoint
from tokenmill.worker import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.decode_layers_supported(),
                                reason="no AVX-512 bf16 (or no C compiler) here")


class BothPaths:
    """Stands in for a model's stack: each step it serves runs natively, then through the
    Python layers (which rewrite the same K/V slots), and records whether they agreed."""

    def __init__(self, model):
        self.model, self.stack = model, model.native_decode
        self.steps: list[tuple[int, bool]] = []   # (rows, bit-identical)

    def applies(self, x, meta):
        return self.stack.applies(x, meta)

    def __call__(self, x, cos, sin, kv_caches, meta):
        native = self.stack(x, cos, sin, kv_caches, meta)
        reference = self.model.run_layers(x, cos, sin, kv_caches, meta)
        self.steps.append((x.shape[0], torch.equal(native, reference)))
        return reference


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),                                  # head_dim 16: the portable attention kernel
    ("llama", {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),                                  # q/k/v bias
    ("qwen3", {}),                                  # q/k norm, head_dim 32
    ("mistral", {"sliding_window": 12}),
])
def test_native_stack_equals_the_python_layers_on_every_decode_step(tmp_path, arch, overrides):
    path = make_checkpoint(tmp_path / arch, arch, size="tiny", **overrides)
    llm = LLM(model=str(path), dtype="bfloat16", show_progress=False, block_size=4, device="cpu")
    model = llm.engine.core.runner.model.model
    assert model.native_decode is not None
    both = model.native_decode = BothPaths(model)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 77, 18)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert len(both.steps) >= 15 and {rows for rows, _ in both.steps} >= {4}
    assert all(same for _, same in both.steps), both.steps


def test_stack_steps_aside_for_prefills_and_large_batches(tmp_path, monkeypatch):
    from tokenmill.worker import cpu_gemm

    # The large path from 8 rows (where it is not AMX): decode steps of 12 rows take it, so
    # the stack must leave them to the Python layers.
    for path in ("fp32", "onednn"):
        monkeypatch.setitem(cpu_gemm.MIN_ROWS, path, 8)
    path = make_checkpoint(tmp_path / "m", "llama", size="tiny")
    llm = LLM(model=str(path), dtype="bfloat16", show_progress=False, block_size=4, device="cpu")
    model = llm.engine.core.runner.model.model
    both = model.native_decode = BothPaths(model)
    prompts = [{"prompt_token_ids": [3 + i, 4, 5]} for i in range(12)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert all(same for _, same in both.steps)
    if both.stack.max_rows is None:      # AMX: every decode step is the stack's
        assert max(rows for rows, _ in both.steps) == 12
    else:
        assert both.stack.max_rows == 8 and all(rows < 8 for rows, _ in both.steps)
