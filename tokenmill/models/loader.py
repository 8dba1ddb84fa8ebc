"""Load a local Hugging Face checkpoint folder (config.json + *.safetensors) into a tokenmill model.

    config = load_hf_config(path)                 # validates the folder, with clear errors
    model = load_model(path, config, resolve_dtype("auto", config), "cuda")

The model is built on the meta device (no memory, no random init), each parameter is then
allocated once in the target dtype on the target device, and tensors are streamed one at a time
from the safetensors files into it, so peak memory stays about one copy of the weights.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tokenmill.models.registry import CausalLM, get_model_class, supported_architectures

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked to all be present."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"checkpoint shard {name} listed in {INDEX_FILE} is missing from {folder}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (found {', '.join(bins)}: .bin checkpoints are not supported, convert them " \
                f"to safetensors)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{found}")
    return files


def model_architecture(config) -> str:
    """The first of ``config.architectures`` that tokenmill implements."""
    archs = list(getattr(config, "architectures", None) or [])
    supported = supported_architectures()
    for arch in archs:
        if arch in supported:
            return arch
    named = ", ".join(archs) if archs else "none (config.json has no 'architectures')"
    raise ValueError(f"unsupported architecture: {named}; supported: {', '.join(supported)}")


def load_hf_config(path: str | os.PathLike):
    """Read and validate a checkpoint folder; returns the transformers ``PretrainedConfig``."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_architecture(config)
    weight_files(folder)
    return config


def resolve_dtype(dtype: str | torch.dtype, config) -> torch.dtype:
    """``"auto"`` -> the checkpoint's dtype (``config.dtype``, float32 if unset); else by name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # NOTE: transformers 5 stores `dtype`; older configs say `torch_dtype` (reading that
        # attribute on a new config only warns, so look at it last).
        dtype = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype") or "float32"
        if isinstance(dtype, torch.dtype):
            return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def load_model(path: str | os.PathLike, config, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", *, progress: bool = True) -> CausalLM:
    """Build the model for ``config`` and load the folder's weights into it, in eval mode."""
    dtype = resolve_dtype(dtype, config)
    cls = get_model_class(model_architecture(config))
    with torch.device("meta"):
        model = cls(config)
    materialize(model, dtype, torch.device(device))
    model.load_weights(_stream_tensors(weight_files(path), progress))
    return model.eval()


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every meta parameter uninitialized storage (``load_weights`` fills it); shared
    parameters (tied embeddings) stay shared. Buffers keep their dtype (rope frequencies stay
    float32) and move to ``device``."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in new:
                new[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
            setattr(module, name, new[id(param)])
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                raise RuntimeError(f"buffer {name} of {type(module).__name__} was built on the "
                                   f"meta device; compute it with an explicit device")
            setattr(module, name, buf.to(device))


def _stream_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm import tqdm

    total = 0
    for f in files:
        with safe_open(f, framework="pt") as fh:
            total += len(fh.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for f in files:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
                    bar.update(1)
