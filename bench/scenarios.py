"""The benchmark's scenarios: one checkout+checkin cycle per pool kind, each on fresh pools per variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter_ns as perf_ns
from typing import Any, Callable

VARIANTS = ("bare", "dbpool", "dbpool+sites", "dbpool+leaks", "otel")
PSYCOPG_OTEL_NA = ("opentelemetry-instrumentation-psycopg wraps connect() and cursors only; "
                   "pool checkout/checkin is not instrumented")


# --- one block: N cycles between two clock reads; the loop is the same for every variant -------
def sa_raw(engine: Any, n: int) -> int:
    raw = engine.raw_connection
    t0 = perf_ns()
    for _ in range(n):
        raw().close()
    return perf_ns() - t0


def sa_connect(engine: Any, n: int) -> int:
    connect = engine.connect
    t0 = perf_ns()
    for _ in range(n):
        with connect():
            pass
    return perf_ns() - t0


def pg_connection(pool: Any, n: int) -> int:
    connection = pool.connection
    t0 = perf_ns()
    for _ in range(n):
        with connection():
            pass
    return perf_ns() - t0


async def sa_async_connect(engine: Any, n: int) -> int:
    connect = engine.connect
    t0 = perf_ns()
    for _ in range(n):
        async with connect():
            pass
    return perf_ns() - t0


async def pg_async_connection(pool: Any, n: int) -> int:
    connection = pool.connection
    t0 = perf_ns()
    for _ in range(n):
        async with connection():
            pass
    return perf_ns() - t0


@dataclass
class Variant:
    name: str
    target: Any = None
    exporter: Any = None
    na: str = ""  # why this variant is not measured
    samples: list[float] = field(default_factory=list)  # cost per cycle, one per round
    fold: list[float] = field(default_factory=list)  # poll job's cost per cycle folded, one per round


@dataclass
class Scenario:
    title: str
    run: Callable[[Any, int], Any]
    variants: list[Variant]
    is_async: bool = False

    async def block(self, variant: Variant, n: int) -> int:
        result = self.run(variant.target, n)
        return await result if self.is_async else result


def sa_url(dsn: str, driver: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def _instrument(variant: Variant, name: str) -> None:
    from dbpool_exporter import Exporter

    # Never started: the driver folds after each block itself (as the poll job would) and
    # reports that cost apart, instead of letting a poll thread land on random variants.
    leaks = 30.0 if variant.name == "dbpool+leaks" else None
    variant.exporter = Exporter().register(name, variant.target, leak_threshold=leaks)
    if variant.name == "dbpool+sites":
        # What every checkout pays while the pool is busy (half used, or a connection held past
        # site_age): its site is captured. A negative age keeps capture on for a quiet pool.
        variant.exporter.poller.states[name].source.recorder.site_age = -1.0


def _otel(engines: list[Any]) -> str:
    """Instrument ``engines`` with opentelemetry-instrumentation-sqlalchemy; '' or why not."""
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from sqlalchemy.engine import Engine
    except ImportError as e:
        return f"{e.name} not installed: pip install -e '.[bench]'"

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # The SDK as in production (recording spans, a batch processor, a metric reader) exporting
    # nowhere, so the figure is the instrumentation's own cost, not a collector's.
    tracer_provider = TracerProvider()
    # Deep enough that no span is dropped: a dropped span would cost less than a kept one.
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 18))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    # skip_dep_check: the package declares sqlalchemy < 2.1, and works with 2.1.
    SQLAlchemyInstrumentor().instrument(engines=[getattr(e, "sync_engine", e) for e in engines],
                                        tracer_provider=tracer_provider, meter_provider=meter_provider,
                                        skip_dep_check=True)
    # instrument() also wraps Engine.connect for every engine in the process (a "connect" span).
    # Keep that on the OpenTelemetry engines only, so bare and dbpool engines stay as they were.
    wrapper = Engine.__dict__["connect"]
    if hasattr(wrapper, "__wrapped__"):
        Engine.connect = wrapper.__wrapped__  # type: ignore[method-assign]
        for e in engines:
            sync = getattr(e, "sync_engine", e)
            sync.connect = wrapper.__get__(sync, Engine)
    return ""


async def build(dsn: str, wanted: set[str], with_async: bool) -> tuple[list[Scenario], Callable[[], Any]]:
    """Every scenario's pools, opened and instrumented; returns them and an async closer."""
    import sqlalchemy as sa
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.ext.asyncio import create_async_engine

    scenarios: list[Scenario] = []
    closers: list[Callable[[], Any]] = []
    otel: list[Variant] = []

    def engines(title: str, run: Callable[..., Any], make: Callable[[], Any], is_async: bool = False) -> None:
        variants = []
        for name in VARIANTS:
            v = Variant(name, make())
            closers.append(v.target.dispose)
            if name == "otel":
                otel.append(v)
            elif name != "bare":
                _instrument(v, f"{run.__name__}-{name}")
            variants.append(v)
        scenarios.append(Scenario(title, run, variants, is_async))

    async def pools(title: str, run: Callable[..., Any], make: Callable[[], Any], is_async: bool = False) -> None:
        variants = []
        for name in VARIANTS:
            if name == "otel":
                variants.append(Variant(name, na=PSYCOPG_OTEL_NA))
                continue
            v = Variant(name, make())
            if is_async:
                await v.target.open(wait=True)
            else:
                v.target.open(wait=True)
            closers.append(v.target.close)
            if name != "bare":
                _instrument(v, f"{run.__name__}-{name}")
            variants.append(v)
        scenarios.append(Scenario(title, run, variants, is_async))

    url = sa_url(dsn, "psycopg")
    engines("SQLAlchemy QueuePool: engine.raw_connection().close()", sa_raw, lambda: sa.create_engine(url))
    engines("SQLAlchemy QueuePool: with engine.connect(): pass", sa_connect, lambda: sa.create_engine(url))
    await pools("psycopg_pool ConnectionPool: with pool.connection(): pass", pg_connection,
                lambda: ConnectionPool(dsn, min_size=1, max_size=4, open=False))
    if with_async:
        aurl = sa_url(dsn, "asyncpg")
        engines("SQLAlchemy AsyncEngine (asyncpg): async with engine.connect(): pass", sa_async_connect,
                lambda: create_async_engine(aurl), is_async=True)
        await pools("psycopg_pool AsyncConnectionPool: async with pool.connection(): pass",
                    pg_async_connection, lambda: AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False),
                    is_async=True)
    # One instrument() call for every OpenTelemetry engine: the instrumentor is a singleton.
    why = _otel([v.target for v in otel]) if "otel" in wanted else "not requested"
    for v in otel:
        v.na = why

    async def close() -> None:
        for closer in closers:
            result = closer()
            if hasattr(result, "__await__"):
                await result

    return scenarios, close
