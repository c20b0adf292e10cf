"""How long clients are told to wait, and how long the gateway's own calls may take: named once.

Retry-After values are hints to clients (the OpenAI SDK honours them): short where the gateway
knows help is on its way, longer where it does not. Timeouts an operator tunes per deployment
live in the config (`timeouts:`); these are the gateway's fixed ones.
"""

from __future__ import annotations

# Retry-After, in seconds.
RETRY_LOADING = 10  # the model's server is starting or restarting
RETRY_NO_REPLICA = 30  # no replica ready and none on its way
RETRY_UNREACHABLE = 5  # a replica refused or dropped the connection before answering
RETRY_CONCURRENCY = 1  # the key has max_concurrent requests in flight; one ends soon
RETRY_LIMITS_STORE = 5  # Redis, where limits are counted, cannot be reached (fail_closed)

# The gateway's own calls to backends, in seconds.
MODEL_LOOKUP = 3.0  # /v1/models of a backend, for its max_model_len
BACKEND_METRICS = 5.0  # /backends/<model>/metrics, relayed
# Idle keep-alive connections to a backend are closed after this: below vLLM's own 5 s
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so the gateway never sends on a connection the server is
# closing at that moment.
UPSTREAM_KEEPALIVE = 4.0
