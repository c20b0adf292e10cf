"""Traffic that keeps flowing: how requests share a model (queues and priorities), what a
request does when its model cannot answer it (fallbacks to other models), and how long each
model may take (per-model timeouts). The relay (``gateway.relay``) calls in here; nothing here
imports the relay."""
