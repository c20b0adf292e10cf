"""vllm-gateway: one OpenAI-compatible URL in front of several vLLM servers."""

__version__ = "0.1.0"
