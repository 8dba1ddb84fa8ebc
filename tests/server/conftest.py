"""Fixtures of the server tests: the reference transformers tokenizer of the test checkpoint
and a copy of that checkpoint without a chat template. Each module starts its own server
(``_server.start_server``, module-scoped); these fixtures never start one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_llama):
    """The reference tokenizer: usage counts must equal what it says."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="session")
def no_template_checkpoint(tiny_llama, tmp_path_factory) -> str:
    """tiny_llama with its chat template removed, wherever the template lives."""
    out = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_llama, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").unlink(missing_ok=True)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(out)
