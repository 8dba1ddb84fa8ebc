"""Shared fixtures: tiny checkpoints made once per session (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every engine step in the tests checks the KV allocator's invariants.
os.environ.setdefault("TOKENMILL_CHECK_INVARIANTS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(arch, **overrides) -> folder of a tiny random checkpoint, cached per arguments."""
    from tokenmill.testing.checkpoints import make_checkpoint

    cache: dict = {}

    def make(arch: str = "llama", **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = str(make_checkpoint(out, arch, **kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(checkpoint_factory) -> str:
    return checkpoint_factory("llama")
