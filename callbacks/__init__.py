"""Lightning callbacks shared by MemLM architectures."""
from callbacks.throughput import TokenThroughput  # noqa: F401
