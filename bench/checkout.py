"""Hot-path benchmark: one pool checkout+checkin, bare vs instrumented, side by side in one run.

Run ``python bench/checkout.py --help``. Every variant gets its own fresh engine/pool against the
same server; rounds rotate the variant order so machine drift lands on all of them alike. The
figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
VARIANTS = ("bare", "dbpool", "dbpool+leaks", "otel")
perf_ns = time.perf_counter_ns


# --- one timed block per scenario: N cycles between two clock reads --------------------------
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
    na: str = ""  # why this variant cannot be measured
    samples: list[float] = field(default_factory=list)  # ns per cycle, one per round
    fold: list[float] = field(default_factory=list)  # poll-thread ns per cycle, one per round


@dataclass
class Scenario:
    title: str
    run: Callable[[Any, int], Any]
    variants: list[Variant]
    is_async: bool = False


# --- setup ---------------------------------------------------------------------------------
def sa_url(dsn: str, driver: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def instrument(variant: Variant, name: str, leaks: bool) -> None:
    from dbpool_exporter import Exporter

    # Never started: the poll job's fold() is timed separately, after each block, so the
    # poll thread's work is reported in its own column instead of landing on random variants.
    variant.exporter = Exporter().register(name, variant.target, leak_threshold=30.0 if leaks else None)


def otel_setup(engines: list[Any]) -> str:
    """Instrument ``engines`` with opentelemetry-instrumentation-sqlalchemy; '' or why not."""
    if not engines:
        return ""
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    except ImportError as e:
        return f"not installed ({e.name}): pip install -e '.[bench]'"

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # An SDK set up as in production (recording spans, a batch processor, a metric reader) but
    # exporting nowhere, so the figure is the instrumentation's own cost, not a network's.
    tracer_provider = TracerProvider()
    # A queue deep enough that no span is dropped (a dropped span would be cheaper than a real one).
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 18))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    # skip_dep_check: the package declares sqlalchemy < 2.1 but works with 2.1.
    SQLAlchemyInstrumentor().instrument(engines=[getattr(e, "sync_engine", e) for e in engines],
                                        tracer_provider=tracer_provider, meter_provider=meter_provider,
                                        skip_dep_check=True)
    # instrument() also wraps Engine.connect for every engine in the process (a "connect" span).
    # Keep that span on the OpenTelemetry engines only, so bare and dbpool stay bare.
    from sqlalchemy.engine import Engine

    wrapper = Engine.__dict__["connect"]
    if hasattr(wrapper, "__wrapped__"):
        Engine.connect = wrapper.__wrapped__  # type: ignore[method-assign]
        for e in engines:
            sync = getattr(e, "sync_engine", e)
            sync.connect = wrapper.__get__(sync, Engine)
    return ""


def sync_scenarios(dsn: str, otel_engines: list[Any]) -> tuple[list[Scenario], Callable[[], None]]:
    import sqlalchemy as sa
    from psycopg_pool import ConnectionPool

    url = sa_url(dsn, "psycopg")
    scenarios: list[Scenario] = []
    closers: list[Callable[[], None]] = []
    for title, run in (("SQLAlchemy QueuePool: engine.raw_connection().close()", sa_raw),
                       ("SQLAlchemy QueuePool: with engine.connect(): pass", sa_connect)):
        variants = []
        for name in VARIANTS:
            v = Variant(name, sa.create_engine(url))
            closers.append(v.target.dispose)
            if name == "otel":
                otel_engines.append(v.target)
            elif name != "bare":
                instrument(v, f"{run.__name__}-{name}", leaks=name == "dbpool+leaks")
            variants.append(v)
        scenarios.append(Scenario(title, run, variants))
    variants = []
    for name in VARIANTS:
        if name == "otel":
            variants.append(Variant(name, na=PSYCOPG_OTEL_NA))
            continue
        pool = ConnectionPool(dsn, min_size=1, max_size=4, open=True)
        pool.wait()
        closers.append(pool.close)
        v = Variant(name, pool)
        if name != "bare":
            instrument(v, f"psycopg-{name}", leaks=name == "dbpool+leaks")
        variants.append(v)
    scenarios.append(Scenario("psycopg_pool ConnectionPool: with pool.connection(): pass", pg_connection, variants))
    return scenarios, lambda: [close() for close in closers]


PSYCOPG_OTEL_NA = ("opentelemetry-instrumentation-psycopg wraps connect() and cursors only; "
                   "pool checkout/checkin is not instrumented")


def async_engine_scenario(dsn: str, otel_engines: list[Any]) -> Scenario:
    from sqlalchemy.ext.asyncio import create_async_engine

    url = sa_url(dsn, "asyncpg")
    variants = []
    for name in VARIANTS:
        v = Variant(name, create_async_engine(url))
        if name == "otel":
            otel_engines.append(v.target)
        elif name != "bare":
            instrument(v, f"async-sa-{name}", leaks=name == "dbpool+leaks")
        variants.append(v)
    return Scenario("SQLAlchemy AsyncEngine (asyncpg): async with engine.connect(): pass",
                    sa_async_connect, variants, is_async=True)


async def async_pool_scenario(dsn: str) -> tuple[Scenario, Callable[[], Any]]:
    from psycopg_pool import AsyncConnectionPool

    closers: list[Callable[[], Any]] = []
    variants = []
    for name in VARIANTS:
        if name == "otel":
            variants.append(Variant(name, na=PSYCOPG_OTEL_NA))
            continue
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
        await pool.open(wait=True)
        closers.append(pool.close)
        v = Variant(name, pool)
        if name != "bare":
            instrument(v, f"async-psycopg-{name}", leaks=name == "dbpool+leaks")
        variants.append(v)
    scenario = Scenario("psycopg_pool AsyncConnectionPool: async with pool.connection(): pass",
                        pg_async_connection, variants, is_async=True)

    async def close_all() -> None:
        for close in closers:
            await close()

    return scenario, close_all


# --- measuring -------------------------------------------------------------------------------
async def measure(scenario: Scenario, n: int, rounds: int, warmup: int, wanted: set[str]) -> None:
    live = [v for v in scenario.variants if not v.na and v.name in wanted]

    async def block(v: Variant, cycles: int) -> int:
        result = scenario.run(v.target, cycles)
        return await result if scenario.is_async else result

    for v in live:
        await block(v, warmup)
        if v.exporter is not None:
            v.exporter.poll_now()
    for r in range(rounds):
        k = r % len(live)
        for v in live[k:] + live[:k]:  # rotate who goes first
            gc.collect()
            v.samples.append(await block(v, n) / n)
            if v.exporter is not None:
                t0 = perf_ns()
                v.exporter.poll_now()  # fold this block's events, as the poll job would
                v.fold.append((perf_ns() - t0) / n)


# --- reporting -------------------------------------------------------------------------------
def report(scenarios: list[Scenario], wanted: set[str]) -> None:
    print("| scenario | variant | µs/cycle (median) | × bare | + ns/cycle | fold ns/cycle (poll thread) |")
    print("|---|---|---:|---:|---:|---:|")
    for s in scenarios:
        bare = next(v for v in s.variants if v.name == "bare")
        base = statistics.median(bare.samples) if bare.samples else None
        for v in s.variants:
            if v.name not in wanted:
                continue
            label = s.title if v is s.variants[0] else ""
            if v.na or not v.samples:
                print(f"| {label} | {v.name} | n/a: {v.na or 'not measured'} | | | |")
                continue
            med = statistics.median(v.samples)
            ratio = f"{med / base:.2f}×" if base else "—"
            extra = f"{med - base:+.0f}" if base and v is not bare else "—"
            fold = f"{statistics.median(v.fold):.0f}" if v.fold else "—"
            print(f"| {label} | {v.name} | {med / 1000:.2f} | {ratio} | {extra} | {fold} |")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for dist in ("sqlalchemy", "psycopg", "psycopg-pool", "asyncpg", "opentelemetry-instrumentation-sqlalchemy"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", "-n", type=int, default=20000, help="cycles per timed block (default 20000)")
    p.add_argument("--rounds", "-r", type=int, default=7, help="interleaved rounds per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2000, help="untimed cycles per variant first (default 2000)")
    p.add_argument("--dsn", default=os.environ.get("DBPOOL_TEST_DSN", DEFAULT_DSN),
                   help="libpq URL (default: $DBPOOL_TEST_DSN or %(default)s)")
    p.add_argument("--no-async", action="store_true", help="skip the asyncio scenarios")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (bare is always measured)")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--iterations and --rounds must be positive, --warmup not negative")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    return args


async def amain(args: argparse.Namespace) -> list[Scenario]:
    wanted = set(args.variants.split(",")) | {"bare"}
    otel_engines: list[Any] = []
    scenarios, close = sync_scenarios(args.dsn, otel_engines)
    async_engines = None if args.no_async else async_engine_scenario(args.dsn, otel_engines)
    # One instrument() call for every OpenTelemetry engine: the instrumentor is a singleton.
    otel_na = otel_setup(otel_engines) if "otel" in wanted else "not requested"
    for s in scenarios + ([async_engines] if async_engines else []):
        for v in s.variants:
            if v.name == "otel" and otel_na and not v.na:
                v.na = otel_na
    try:
        for s in scenarios:
            await measure(s, args.iterations, args.rounds, args.warmup, wanted)
    finally:
        close()
    if async_engines is not None:
        # asyncio cycles cost more than sync ones: fewer of them keep the run short.
        n, warmup = max(1, args.iterations // 4), max(1, args.warmup // 4)
        pools, close_pools = await async_pool_scenario(args.dsn)
        try:
            for s in (async_engines, pools):
                await measure(s, n, args.rounds, warmup, wanted)
        finally:
            for v in async_engines.variants:
                if v.target is not None:
                    await v.target.dispose()
            await close_pools()
        scenarios += [async_engines, pools]
    return scenarios


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    wanted = set(args.variants.split(",")) | {"bare"}
    try:
        import psycopg

        psycopg.connect(args.dsn, connect_timeout=5).close()
    except Exception as e:  # one clear line, and never the DSN (it may hold a password)
        from dbpool_exporter.redact import scrub

        print(f"checkout.py: cannot connect to the benchmark server: {scrub(str(e)).splitlines()[0]}",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    scenarios = asyncio.run(amain(args))
    print(f"# checkout+checkin cost, {args.rounds} interleaved rounds × {args.iterations} cycles "
          f"(async: {max(1, args.iterations // 4)}), median per cycle")
    print(f"# {versions()}; {os.cpu_count()} CPUs; {platform.platform()}")
    print()
    report(scenarios, wanted)
    print()
    print(f"# took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
