"""Per-scrape builder of metric families, so each snapshot adds samples without owning families."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from .metrics import MetricSpec

# Set (to anything) by the test suite: every sample's label names are checked against the catalogue,
# so an undeclared or missing label fails a test instead of breaking a dashboard. Off in production,
# where a scrape must never raise.
CHECK_ENV = "DBPOOL_EXPORTER_CHECK_METRICS"


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative histogram state copied at poll time (bucket upper bounds and cumulative counts)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0


class Families:
    """Collects samples into one family per catalogue entry, created on first use."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}
        self._check = bool(os.environ.get(CHECK_ENV))

    def _family(self, spec: MetricSpec, typ: str, labels: Mapping[str, str]) -> Metric:
        if self._check:
            problem = spec.label_problem(labels) or (
                None if spec.type == typ else f"{spec.name}: declared {spec.type}, emitted as {typ}")
            if problem:
                raise ValueError(problem)
        family = self._families.get(spec.name)
        if family is None:
            family = self._families[spec.name] = Metric(spec.name, spec.help, typ)
        return family

    def gauge(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        self._family(spec, "gauge", labels).samples.append(Sample(spec.name, dict(labels), value))

    def counter(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        family = self._family(spec, "counter", labels)
        family.samples.append(Sample(spec.name + "_total", dict(labels), value))

    def info(self, spec: MetricSpec, labels: Mapping[str, str]) -> None:
        self._family(spec, "info", labels).samples.append(Sample(spec.name + "_info", dict(labels), 1.0))

    def histogram(self, spec: MetricSpec, labels: Mapping[str, str], hist: Histogram) -> None:
        name = spec.name
        family = self._family(spec, "histogram", labels)
        for bound, count in zip(hist.bounds, hist.cumulative, strict=True):
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            family.samples.append(Sample(name + "_bucket", {**labels, "le": le}, count))
        family.samples.append(Sample(name + "_count", dict(labels), hist.count))
        family.samples.append(Sample(name + "_sum", dict(labels), hist.total))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())
