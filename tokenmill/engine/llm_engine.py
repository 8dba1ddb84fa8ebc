"""LLMEngine: the synchronous, in-process engine behind the offline ``LLM`` API.

    add_request -> InputProcessor -> EngineCore.add_request
    step        -> EngineCore.step -> OutputProcessor.process -> RequestOutputs
"""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore, resolve_max_model_len
from tokenmill.engine.output_processor import InputProcessor, OutputProcessor, PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import load_generation_defaults, load_tokenizer


class FrontEnd:
    """What both the sync and the async engine hold in the front process."""

    def __init__(self, config: EngineConfig, chat_template: str | None = None):
        from tokenmill.models.loader import load_hf_config

        resolve_max_model_len(config)
        self.config = config
        self.max_model_len = config.model.max_model_len
        path = config.model.model
        self.hf_config = load_hf_config(path)
        self.tokenizer = load_tokenizer(config.model.tokenizer or path, chat_template)
        self.generation_defaults = load_generation_defaults(path, self.tokenizer)
        self.input_processor = InputProcessor(
            self.tokenizer, self.max_model_len, self.generation_defaults.eos_token_ids,
            self.hf_config.vocab_size)
        self.output_processor = OutputProcessor(self.tokenizer)


class LLMEngine(FrontEnd):
    def __init__(self, config: EngineConfig, chat_template: str | None = None,
                 progress: bool = True):
        super().__init__(config, chat_template)
        self.core = EngineCore(config, progress=progress)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0) -> None:
        text, ids, children = self.input_processor.process(request_id, prompt, params, priority)
        self.output_processor.add_request(request_id, text, ids, params, children)
        for child in children:
            self.core.add_request(child)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outs = self.core.step()
        ready, to_abort = self.output_processor.process(outs.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        self.last_stats = outs.stats
        return ready
