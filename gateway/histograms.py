"""Histograms counted in plain lists (per bucket, not cumulative) and turned into metric
families at scrape time: prometheus_client's own observe in Python on every request, under a
lock. Another process's counts of the same series add in (``gateway.workers``)."""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any

from prometheus_client.core import HistogramMetricFamily


class Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def add(self, counts: list[int], total: float) -> None:
        """Another process's observations of the same series."""
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total


def observe(
    histograms: dict[Any, Histogram], labels: Any, bounds: tuple[float, ...], value: float
) -> None:
    histogram = histograms.get(labels)
    if histogram is None:
        histogram = histograms[labels] = Histogram(len(bounds))
    histogram.counts[bisect_left(bounds, value)] += 1  # the first bound >= value: `le`
    histogram.total += value


def histogram_family(
    name: str,
    documentation: str,
    labels: list[str],
    bounds: tuple[float, ...],
    histograms: dict[Any, Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    edges = [str(float(b)) for b in bounds] + ["+Inf"]  # as prometheus_client writes `le`
    for label_values, histogram in list(histograms.items()):
        buckets = list(zip(edges, accumulate(histogram.counts), strict=True))
        family.add_metric(list(label_values), buckets, histogram.total)
    return family
