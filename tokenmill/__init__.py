"""tokenmill: an LLM inference engine and OpenAI-compatible server."""

import os as _os

# Nothing in tokenmill may reach the network: models and tokenizers are local folders.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# oneDNN picks AMX kernels for bf16 matmuls when the CPU advertises AMX, and sizes the tiles from
# CPUID leaf 0x1D, which some virtual machines report as zeros: its empty tiles then die on SIGILL.
# AVX-512 bf16 runs everywhere it is advertised; oneDNN reads this before its first matmul.
# (tokenmill's own AMX kernel, worker/csrc/linear_amx.c, configures the tiles itself.)
_os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from tokenmill.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch; import it lazily so the control plane stays light.
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestOutputKind", "__version__"]
