"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Owns everything with torch in the engine core: the weights, the paged KV cache, the sampler
and the per-request seeded generators. Called by ``EngineCore.step`` once per step.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from tokenmill.config import GiB, EngineConfig
from tokenmill.engine.interfaces import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.models.loader import load_hf_config, load_model, resolve_dtype
from tokenmill.worker.attention import AttentionMetadata, PrefillChunk, causal_mask, decode_mask
from tokenmill.worker.sampler import Sampler, SamplingRow, compute_prompt_logprobs

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_MEMORY = 2 * GiB
GPU_MEMORY_FRACTION = 0.9


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True):
        mc = config.model
        self.device = torch.device(mc.resolved_device())
        self.hf_config = load_hf_config(mc.model)
        self.dtype = resolve_dtype(mc.dtype, self.hf_config)
        self.model = load_model(mc.model, self.hf_config, self.dtype, self.device, progress=progress)
        self.block_size = config.cache.block_size
        self.sliding_window = getattr(self.model, "sliding_window", None)
        self.num_blocks = self._decide_num_blocks(config)
        shape = (self.num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        # NOTE: zeros, not empty: masked-out padding slots still enter the attention matmul,
        # and 0 * NaN garbage would poison real rows.
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.model.num_layers)]
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
        # NOTE: decodes first (one token each) so attention can batch them as one padded block.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].num_tokens != 1)
        input_ids, positions, meta, logit_rows, plp_rows = self._prepare(seqs, order)
        t0 = time.perf_counter()
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
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

    def _prepare(self, seqs: list[ScheduledSeq], order: list[int]):
        bs, window = self.block_size, self.sliding_window
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[tuple[int, int]] = []    # (seq index, row of its last token)
        plp_rows: list[tuple[int, tuple[int, int], list[int]]] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for i in order:
            s = seqs[i]
            start, num, blocks = s.start_pos, s.num_tokens, s.block_ids
            row0 = len(input_ids)
            toks = s.request.all_token_ids
            input_ids.extend(toks[start:start + num])
            positions.extend(range(start, start + num))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + num))
            ctx = start + num
            nblk = -(-ctx // bs)
            if num == 1:
                dec_tables.append(blocks[:nblk])
                dec_lens.append(ctx)
            else:
                mask = None
                if start > 0 or (window is not None and ctx > window):
                    mask = causal_mask(num, start, ctx, window, self.device)
                prefills.append(PrefillChunk(row0, num, start, self._tensor(blocks[:nblk]), mask))
            if s.sample:
                logit_rows.append((i, row0 + num - 1))
            if s.request.params.prompt_logprobs is not None:
                # Rows whose next token is still a prompt token.
                end = min(ctx, s.request.num_prompt_tokens - 1)
                if end > start:
                    plp_rows.append((i, (row0, row0 + end - start),
                                     toks[start + 1:end + 1]))
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), num_decode_tokens=len(dec_lens),
                                 prefills=prefills)
        if dec_lens:
            width = max(len(t) for t in dec_tables)
            meta.decode_block_table = self._tensor([t + [0] * (width - len(t)) for t in dec_tables])
            meta.decode_mask = decode_mask(dec_lens, width * bs, window, self.device)
        return (self._tensor(input_ids), self._tensor(positions), meta, logit_rows, plp_rows)

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)
