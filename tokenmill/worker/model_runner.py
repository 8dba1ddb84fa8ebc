"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Owns everything with torch in the engine core: the weights, the paged KV cache, the sampler
and the per-request seeded generators. Called by ``EngineCore.step`` once per step.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import time

import torch

from tokenmill.config import GiB, EngineConfig
from tokenmill.engine.interfaces import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.models.loader import load_hf_config, load_model, resolve_dtype
from tokenmill.worker import cpu_gemm, cpu_kernels
from tokenmill.worker.attention import KVCacheSpec, SeqSpan, build_metadata
from tokenmill.worker.cuda_graphs import DecodeGraphs
from tokenmill.worker.sampler import Sampler, SamplingRow, compute_prompt_logprobs

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_MEMORY = 2 * GiB
GPU_MEMORY_FRACTION = 0.9
# bf16 on CPU: the large matmuls on the path ``cpu_gemm.choose`` measures fastest here, few rows
# on packed bf16 weights, when the extra weight copies take at most CPU_GEMM_MAX_BYTES.
CPU_GEMM_MAX_BYTES = 6 * GiB


# glibc hands allocations above its mmap threshold (at most 32 MiB) fresh pages from the OS and
# unmaps them on free, and trims the heap top on free: a step's large CPU tensors (activations of
# a 2,048-token prefill, [64, vocab] logits) then page-fault on every step. Keeping freed memory
# in the heap made 2,048-row AMX matmuls 1.6-2.7x faster (BENCHMARKS.md).
CPU_MALLOC_KEEP_BYTES = 1 << 30


def keep_freed_cpu_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (no-op elsewhere)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, CPU_MALLOC_KEEP_BYTES)
                    and libc.mallopt(m_trim_threshold, 2 * CPU_MALLOC_KEEP_BYTES))
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return False


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True):
        mc = config.model
        self.device = torch.device(mc.resolved_device())
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        self.hf_config = load_hf_config(mc.model)
        self.dtype = resolve_dtype(mc.dtype, self.hf_config)
        self.model = load_model(mc.model, self.hf_config, self.dtype, self.device, progress=progress)
        logger.info("model on %s in %s", self.device, str(self.dtype).removeprefix("torch."))
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            plan = cpu_gemm.choose()
            if self.model.cpu_gemm_bytes(plan.large) <= CPU_GEMM_MAX_BYTES:
                extra = self.model.use_cpu_gemm(plan)
                logger.info("bf16 on CPU: large matmuls on %s; packed bf16 below (weight "
                            "copies: %.2f GiB)", plan.describe(), extra / GiB)
        self.block_size = config.cache.block_size
        self.sliding_window = getattr(self.model, "sliding_window", None)
        self.num_blocks = self._decide_num_blocks(config)
        graphs = self.device.type == "cuda" and not mc.enforce_eager
        # With CUDA graphs one block more than the scheduler hands out: the padding's scratch.
        self.kv_spec = KVCacheSpec(self.num_blocks + graphs, self.block_size,
                                   self.model.num_kv_heads, self.model.head_dim)
        self.kv_caches = self.kv_spec.allocate(self.model.num_layers, self.dtype, self.device)
        self.native_decode = cpu_kernels.supports(self.device, self.dtype,
                                                  self.model.num_heads, self.model.num_kv_heads,
                                                  self.model.head_dim)
        self.native_prefill = self.native_decode and cpu_kernels.prefill_supported(
            self.dtype, self.model.head_dim)
        self.mask_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.cuda_graphs = None
        if graphs:
            self.cuda_graphs = DecodeGraphs(
                self.model, self.kv_caches, self.kv_spec, self.num_blocks, self.dtype,
                self.sliding_window, config.scheduler.max_num_seqs,
                -(-config.model.max_model_len // self.block_size))
        self.sampler = Sampler(self.device, seed=mc.seed)
        self.generators: dict[str, torch.Generator] = {}
        self.forward_time = 0.0  # seconds spent in the model forward (read by the profiler)

    # ------------------------------------------------------------------ sizing
    def kv_bytes_per_block(self) -> int:
        m = self.model
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _decide_num_blocks(self, config: EngineConfig) -> int:
        if config.cache.num_kv_blocks is not None:
            return config.cache.num_kv_blocks
        budget = config.cache.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * GPU_MEMORY_FRACTION)
            else:
                budget = CPU_DEFAULT_KV_MEMORY
        blocks = budget // self.kv_bytes_per_block()
        # More blocks than every sequence at full length can use only holds cached prefixes;
        # cap there so a small model does not zero gigabytes it will never touch.
        mlen = config.model.max_model_len
        useful = config.scheduler.max_num_seqs * math.ceil(mlen / self.block_size) * 2
        blocks = min(blocks, max(useful, 1))
        if blocks < math.ceil(mlen / self.block_size):
            raise ValueError(
                f"KV cache memory {budget / GiB:.2f} GiB holds {blocks} blocks of "
                f"{self.block_size} tokens, fewer than one sequence of max_model_len={mlen} "
                f"needs; raise kv_cache_memory or lower max_model_len")
        return int(blocks)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids:
            self.generators.pop(rid, None)
        seqs = so.scheduled
        # NOTE: decodes first (one token each), longest first, so that attention can batch
        # them in a few groups of similar length (least padding).
        order = sorted(range(len(seqs)), key=lambda i: (seqs[i].num_tokens != 1,
                                                        -seqs[i].start_pos))
        ids, pos, spans, logit_rows, plp_rows = self._flatten(seqs, order)
        t0 = time.perf_counter()
        hidden = self._run_graph(ids, pos, spans)
        if hidden is None:
            meta = build_metadata(spans, self.kv_spec, self.sliding_window, self.device,
                                  self.native_decode, self.native_prefill, self.mask_dtype)
            hidden = self.model(self._tensor(ids), self._tensor(pos), self.kv_caches, meta)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_time += time.perf_counter() - t0

        n = len(seqs)
        sampled: list[int | None] = [None] * n
        logprobs: list = [None] * n
        prompt_lps: list = [None] * n
        if logit_rows:
            idx = [row for _, row in logit_rows]
            logits = self.model.compute_logits(hidden[torch.tensor(idx, device=self.device)])
            rows = [self._sampling_row(seqs[i]) for i, _ in logit_rows]
            tokens, lps = self.sampler.sample(logits, rows)
            for (i, _), tok, lp in zip(logit_rows, tokens, lps):
                sampled[i], logprobs[i] = tok, lp
        for i, rows, targets in plp_rows:
            logits = self.model.compute_logits(hidden[rows[0]:rows[1]])
            prompt_lps[i] = compute_prompt_logprobs(logits, targets,
                                                    seqs[i].request.params.prompt_logprobs)
        return ModelRunnerOutput(sampled, logprobs, prompt_lps)

    def _sampling_row(self, s: ScheduledSeq) -> SamplingRow:
        r = s.request
        gen = None
        if r.params.seed is not None and not r.params.greedy:
            gen = self.generators.get(r.request_id)
            if gen is None:
                gen = torch.Generator(self.device).manual_seed(r.params.seed)
                self.generators[r.request_id] = gen
        return SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.eos_token_ids, gen)

    def _run_graph(self, ids: list[int], pos: list[int],
                   spans: list[SeqSpan]) -> torch.Tensor | None:
        """A decode-only step through a CUDA graph; None where it runs eagerly."""
        if self.cuda_graphs is None or any(s.num_tokens != 1 for s in spans):
            return None
        bs = self.block_size
        shape = self.cuda_graphs.shape_for(len(spans), -(-(max(pos) + 1) // bs))
        if shape is None:
            return None
        return self.cuda_graphs.run(shape, ids, pos, [s.block_ids for s in spans])

    def _flatten(self, seqs: list[ScheduledSeq], order: list[int]):
        input_ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        logit_rows: list[tuple[int, int]] = []    # (seq index, row of its last token)
        plp_rows: list[tuple[int, tuple[int, int], list[int]]] = []
        for i in order:
            s = seqs[i]
            start, num = s.start_pos, s.num_tokens
            row0 = len(input_ids)
            toks = s.request.all_token_ids
            input_ids.extend(toks[start:start + num])
            positions.extend(range(start, start + num))
            spans.append(SeqSpan(start, num, s.block_ids))
            if s.sample:
                logit_rows.append((i, row0 + num - 1))
            if s.request.params.prompt_logprobs is not None:
                # Rows whose next token is still a prompt token.
                end = min(start + num, s.request.num_prompt_tokens - 1)
                if end > start:
                    plp_rows.append((i, (row0, row0 + end - start),
                                     toks[start + 1:end + 1]))
        return input_ids, positions, spans, logit_rows, plp_rows

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)
