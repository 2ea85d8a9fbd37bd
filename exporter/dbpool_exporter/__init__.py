"""dbpool-exporter: Prometheus metrics for database connection pools, in-process or as a daemon."""

from .exporter import Exporter
from .recorder import HOLD_BUCKETS, WAIT_BUCKETS
from .snapshot import PoolSnapshot
from .sources.base import Source
from .sources.postgres import PostgresSource

__all__ = ["Exporter", "HOLD_BUCKETS", "PoolSnapshot", "PostgresSource", "Source", "WAIT_BUCKETS"]
__version__ = "0.1.0"
