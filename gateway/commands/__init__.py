"""Offline tools behind `vllm-gateway`: the CLI, the Kubernetes generator, the tiny-model
builder. Nothing here runs on the request path."""
