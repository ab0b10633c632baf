"""Weir: a high-throughput proxy for LLM APIs, on trio."""

__version__ = "0.1.0"
