"""dbpool-exporter: Prometheus metrics for database connection pools, in-process or as a daemon."""

from .exporter import Exporter
from .recorder import HOLD_BUCKETS, WAIT_BUCKETS
from .snapshot import PoolSnapshot
from .sources.base import Source

__all__ = ["Exporter", "HOLD_BUCKETS", "PoolSnapshot", "PostgresSource", "Source", "WAIT_BUCKETS"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # PostgresSource needs asyncpg (the [daemon] extra); an app watching only its pools never loads it.
    if name == "PostgresSource":
        from .sources.postgres import PostgresSource

        return PostgresSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
