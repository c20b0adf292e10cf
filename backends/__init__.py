"""vLLM backends: what to start, how to supervise it, and the replica pools requests go to.

This package knows nothing of HTTP routing; ``gateway`` uses it, never the other way round.
"""
