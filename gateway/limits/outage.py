"""Whether the limits store answers: said once per outage in the log, counted for /metrics.

While it is down no request waits for it: each is decided at once by the `on_error` policy,
and only the store's heartbeat tries again, every fraction of a second, until it answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("vllm_gateway.limits")

_WHAT_POLICY_DOES = {
    "fail_open": "requests of limited keys pass uncounted",
    "fail_closed": "requests of limited keys are refused with 503",
}


class Outage:
    def __init__(
        self, where: str, policy: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.where = where  # the store's URL (it never holds a password)
        self.policy = policy
        self.clock = clock
        self.down_since: float | None = None
        self.errors = 0  # calls to the store that failed
        self.decided = 0  # requests the policy decided because the store was down
        self._decided_before = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException) -> None:
        self.errors += 1
        if self.down_since is not None:
            return
        self.down_since = self.clock()
        self._decided_before = self.decided
        log.error(
            "limits store %s unreachable (%s: %s); %s: %s until it answers",
            self.where,
            type(error).__name__,
            error,
            self.policy,
            _WHAT_POLICY_DOES[self.policy],
        )

    def answered(self) -> None:
        if self.down_since is None:
            return
        log.warning(
            "limits store %s reachable again after %.1f s; %d requests were decided by %s",
            self.where,
            self.clock() - self.down_since,
            self.decided - self._decided_before,
            self.policy,
        )
        self.down_since = None


class OutageCollector(Collector):
    def __init__(self, outage: Outage) -> None:
        self.outage = outage

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "vllm_gateway_limits_store_up",
            "1 while the shared limits store (Redis) answers, 0 while it cannot be reached.",
        )
        up.add_metric([], 0 if self.outage.down else 1)
        errors = CounterMetricFamily(
            "vllm_gateway_limits_store_errors",
            "Calls to the limits store that failed (unreachable, timed out, refused).",
        )
        errors.add_metric([], self.outage.errors)
        decided = CounterMetricFamily(
            "vllm_gateway_limits_store_policy",
            "Requests the `on_error` policy decided while the limits store was down "
            "(fail_open: let through uncounted; fail_closed: refused with 503).",
            labels=["policy"],
        )
        decided.add_metric([self.outage.policy], self.outage.decided)
        yield up
        yield errors
        yield decided
