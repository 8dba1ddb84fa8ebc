"""Helpers for tests and benchmarks: tiny random checkpoints made locally."""

# The checkpoint variants every architecture test covers (see checkpoints.make_checkpoint).
TEST_ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
