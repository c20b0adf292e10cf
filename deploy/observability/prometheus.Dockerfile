# Prometheus from Debian's own package, for hosts that can pull no image (the CPU demo's
# `--profile observability` in deploy/compose.cpu.yaml). Where prom/prometheus can be pulled,
# deploy/compose.yaml uses it instead. Build from the repository root:
#   podman build -f deploy/observability/prometheus.Dockerfile -t vllm-gateway-prometheus:debian .
ARG CPU_BASE=debian:bookworm-slim
FROM ${CPU_BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -o prometheus -m 600 /dev/null /etc/prometheus/vllm-gateway-key
# hadolint ignore=DL3066
USER prometheus
EXPOSE 9090
# The monitor key comes from the environment (PROMETHEUS_GATEWAY_KEY) into the file that
# prometheus.yml names, at start: no key in the image, none on a command line.
ENTRYPOINT ["/bin/sh", "-c", "printf %s \"$PROMETHEUS_GATEWAY_KEY\" > /etc/prometheus/vllm-gateway-key && exec /usr/bin/prometheus \"$@\"", "prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/metrics2"]
