"""The model interface the runner calls, and the registry of architectures.

A family file defines a ``CausalLM`` subclass and registers it under the ``architectures`` name
found in a checkpoint's config.json::

    @register("LlamaForCausalLM")
    class LlamaForCausalLM(CausalLM): ...

The model runner (worker) sizes the KV cache from ``num_layers``, ``num_kv_heads``, ``head_dim``
and builds masks with ``sliding_window``; each step it calls ``forward`` then ``compute_logits``
on the rows it samples from. The loader calls ``load_weights`` once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.models.layers import FusedLinear, Linear
from tokenmill.worker.attention import AttentionMetadata

ARCHITECTURES: dict[str, type[CausalLM]] = {}

# Checkpoint tensors the model computes itself instead of loading.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def register(*names: str):
    """Class decorator: make a ``CausalLM`` subclass loadable under these architecture names."""
    def wrap(cls):
        for name in names:
            ARCHITECTURES[name] = cls
        return cls
    return wrap


def get_model_class(architecture: str) -> type[CausalLM]:
    _import_families()
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}") from None


def supported_architectures() -> list[str]:
    _import_families()
    return sorted(ARCHITECTURES)


def _import_families() -> None:
    # Importing a family file runs its @register; keep the list here so there is one place to add.
    from tokenmill.models import llama, mistral, qwen2, qwen3  # noqa: F401


class CausalLM(nn.Module):
    """Base of every decoder-only model.

    Attributes the runner reads: ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``hidden_size``, ``vocab_size``, ``sliding_window`` (``None`` = full attention) and
    ``max_position_embeddings``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = (getattr(config, "head_dim", None)
                              or config.hidden_size // config.num_attention_heads)
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.max_position_embeddings: int = config.max_position_embeddings
        self.sliding_window: int | None = self.get_sliding_window(config)

    @classmethod
    def get_sliding_window(cls, config) -> int | None:
        """The attention window of every layer, or None for full attention."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> logits [N, vocab] in the model dtype (as HF's matmul); the sampler
        widens them to float32 only where it needs to."""
        return self.lm_head(hidden)

    def use_cpu_gemm(self, plan) -> int:
        """Switch every Linear to the CPU bf16 fast paths of ``plan`` (a
        ``cpu_gemm.CpuGemmPlan``; see ``layers.Linear``). Returns the bytes the extra weight
        copies take."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.use_cpu_gemm(plan)
        return self.cpu_gemm_bytes(plan.large)

    def cpu_gemm_bytes(self, large: str) -> int:
        """Bytes ``use_cpu_gemm`` adds (``Linear.cpu_gemm_bytes`` over every Linear)."""
        return sum(Linear.cpu_gemm_bytes(m.weight, large) for m in self.modules()
                   if isinstance(m, Linear))

    # -----------------------------------------------------------------------------------------
    # Loading

    def checkpoint_targets(self) -> dict[str, tuple[nn.Parameter, slice | None]]:
        """Checkpoint tensor name -> (parameter, row slice or None for the whole of it).

        Module names follow HF's, so most names map to themselves; a ``FusedLinear`` stands for
        several checkpoint modules (``q_proj``, ``k_proj``, ``v_proj`` -> ``qkv_proj``).
        A parameter shared by two modules (tied embeddings) is listed once, under its first name.
        """
        targets: dict[str, tuple[nn.Parameter, slice | None]] = {}
        seen: set[int] = set()
        for mod_name, module in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for p_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if isinstance(module, FusedLinear):
                    parent = mod_name.rpartition(".")[0]
                    parent = f"{parent}." if parent else ""
                    for shard, rows in module.shards.items():
                        targets[f"{parent}{shard}.{p_name}"] = (param, rows)
                else:
                    targets[f"{prefix}{p_name}"] = (param, None)
        return targets

    def ignored_checkpoint_tensors(self) -> set[str]:
        """Names a checkpoint may carry that are not loaded (e.g. a copy of tied embeddings)."""
        if getattr(self.config, "tie_word_embeddings", False):
            return {"lm_head.weight"}
        return set()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the parameters (casting to their dtype and device).

        Raises ``ValueError`` on a name the model does not have, a shape that does not match,
        or parameters that the checkpoint left unset.
        """
        targets = self.checkpoint_targets()
        ignored = self.ignored_checkpoint_tensors()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_SKIPPED_SUFFIXES) or name in ignored:
                continue
            if name not in targets:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint for "
                                 f"{type(self).__name__}")
            param, rows = targets[name]
            dest = param if rows is None else param[rows]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                              else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) for "
                             f"{type(self).__name__}: {shown}")
