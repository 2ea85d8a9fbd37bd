"""One sample lookup for tests: a metric's value by name and labels, from an exposition, a registry or families."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from dbpool_exporter import Exporter


def sample_value(source: Any, name: str, /, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels``; None if there is none.

    ``source`` is exposition text, a registry or something holding one (an Exporter; collected now), or metric
    families. Labels left out match anything, so several matching samples fail the test rather than one of them
    being picked at random. As in PromQL, ``label=""`` matches a sample without that label.
    """
    if isinstance(source, str):
        families: Iterable[Any] = text_string_to_metric_families(source)
    elif isinstance(source, CollectorRegistry):
        families = source.collect()
    elif isinstance(getattr(source, "registry", None), CollectorRegistry):
        families = source.registry.collect()
    else:
        families = source
    found = [s for family in families for s in family.samples
             if s.name == name and all(s.labels.get(k, "") == v for k, v in labels.items())]
    assert len(found) <= 1, f"{name}{labels} is ambiguous, give more labels: {[s.labels for s in found]}"
    return found[0].value if found else None


def polled_value(exporter: Exporter, name: str, /, **labels: str) -> float | None:
    """``sample_value`` from an Exporter after one ``poll_now()``, so gauges show the pools as they are now."""
    exporter.poll_now()
    return sample_value(exporter, name, **labels)
