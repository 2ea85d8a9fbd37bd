"""The prometheus_client collector: renders each source's latest snapshot at scrape time."""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from . import metrics as m
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

    def collect(self) -> Iterable[Metric]:
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
            out.gauge(m.SOURCE_UP, labels, 1.0 if state.up else 0.0)
            out.gauge(m.SOURCE_POLL_DURATION, labels, state.duration)
            out.gauge(m.SOURCE_LAST_SUCCESS, labels, state.last_success)
            out.counter(m.SOURCE_POLLS, labels, state.polls)
            out.counter(m.SOURCE_ERRORS, labels, state.errors)
            snapshot = state.snapshot  # read once: the poll thread may swap it meanwhile
            if snapshot is not None and state.fresh(now):
                snapshot.emit(name, out)
        return out
