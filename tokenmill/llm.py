"""The offline API, shaped like vLLM's: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from tqdm.auto import tqdm

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.output_processor import PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.tokenizer import apply_chat_template, default_sampling_params


class LLM:
    """An engine in this process for batch generation.

    Example::

        llm = LLM(model="path/to/hf-folder")
        outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
        print(outs[0].outputs[0].text)
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 128,
        max_model_len: int | None = None,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | float | str | None = None,
        device: str = "auto",
        enforce_eager: bool = False,
        chat_template: str | None = None,
        show_progress: bool = True,
    ):
        config = EngineConfig(
            model=ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype,
                              max_model_len=max_model_len, seed=seed, device=device,
                              enforce_eager=enforce_eager),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                              num_kv_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill),
        )
        self.engine = LLMEngine(config, chat_template=chat_template, progress=show_progress)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return default_sampling_params(self.engine.generation_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for "
                             f"{len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        ids = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            rid = str(next(self._ids))
            params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            self.engine.add_request(rid, prompt, params, priority[i] if priority else 0)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text = apply_chat_template(tok, conv, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message,
                                       tools=tools, chat_template=chat_template,
                                       **(chat_template_kwargs or {}))
            # The template already wrote any BOS; do not let encode add a second one.
            prompts.append({"prompt": text,
                            "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True,
                   disable=not use_tqdm)
        start, out_tokens = time.perf_counter(), 0
        with bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{rate:.1f} out tok/s", refresh=False)
        return [done[i] for i in ids]
