"""The prometheus_client collector: renders each source's latest snapshot at scrape time."""

from __future__ import annotations

import time
from typing import Iterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .exposition import Exposition, render
from .families import Families
from .poller import Poller
from .workers import Publisher, add_workers


class DbpoolCollector(Collector):
    """Fresh families on every scrape, so a removed pool or a failed source leaves no stale series."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller
        # Set while this process is one of several workers sharing a directory.
        self.publisher: Publisher | None = None

    def describe(self) -> list[Metric]:
        # Metric names depend on what is registered; an empty describe() makes the registry
        # call collect() lazily instead of at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        text = self.text()
        if text is None:
            return iter(self.own())
        # Every worker, for a registry shared with other collectors; the exporter's own endpoints serve text().
        return text_string_to_metric_families(text)

    def text(self) -> str | None:
        """Every live worker's pools as exposition text, or ``None`` when this process runs alone."""
        publisher = self.publisher
        if publisher is None:
            return None
        out = Exposition()
        add_workers(out, publisher.directory, own=render(self.own()), publisher=publisher)
        return out.text()

    def own(self) -> Families:
        """This process's sources only: what a worker publishes."""
        out = Families()
        now = time.monotonic()
        for name, state in list(self._poller.states.items()):
            labels = {"source": name, "kind": state.source.kind}
            out.gauge("dbpool_source_up", "1 if the source's last poll succeeded, else 0.", labels,
                      1.0 if state.up else 0.0)
            out.gauge("dbpool_source_poll_duration_seconds", "How long the source's last poll took.",
                      labels, state.duration)
            out.gauge("dbpool_source_last_success_timestamp_seconds",
                      "Unix time of the source's last successful poll (0 if never).", labels,
                      state.last_success)
            out.counter("dbpool_source_polls", "Polls of the source.", labels, state.polls)
            out.counter("dbpool_source_errors", "Polls of the source that failed.", labels, state.errors)
            if state.fresh(now):
                state.snapshot.emit(name, out)  # type: ignore[union-attr]
        return out
