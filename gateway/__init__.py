"""WebSocket bridge gateway for streamed LLM answers."""

__version__ = "0.1.0"
