"""Per-scrape builder of metric families, so each snapshot adds samples without owning families."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from .snapshot import Histogram


class Families:
    """Collects samples into one family per metric name, created on first use."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _family(self, name: str, doc: str, typ: str) -> Metric:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Metric(name, doc, typ)
        return family

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self._family(name, doc, "gauge").samples.append(Sample(name, dict(labels), value))

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        family = self._family(name, doc, "counter")
        family.samples.append(Sample(name + "_total", dict(labels), value))

    def info(self, name: str, doc: str, labels: Mapping[str, str]) -> None:
        self._family(name, doc, "info").samples.append(Sample(name + "_info", dict(labels), 1.0))

    def histogram(self, name: str, doc: str, labels: Mapping[str, str], hist: Histogram) -> None:
        family = self._family(name, doc, "histogram")
        for bound, count in zip(hist.bounds, hist.cumulative, strict=True):
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            family.samples.append(Sample(name + "_bucket", {**labels, "le": le}, count))
        family.samples.append(Sample(name + "_count", dict(labels), hist.count))
        family.samples.append(Sample(name + "_sum", dict(labels), hist.total))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())
