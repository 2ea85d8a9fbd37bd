"""Hot-path benchmark: one pool checkout+checkin, bare vs instrumented, side by side in one run.

``python bench/checkout.py`` times every scenario (scenarios.py) in interleaved rounds that
rotate the variant order, so machine drift lands on all variants alike, and prints the median
per cycle and the ratio to bare measured in the same run. ``--instructions`` counts CPU
instructions under ``valgrind --tool=callgrind`` instead: slower, but the same on any quiet or
busy machine. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from time import perf_counter_ns as perf_ns

from scenarios import VARIANTS, Scenario, build

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
# Row of the report: scenario, variant, cost per cycle (None when n/a), fold cost per cycle, why n/a.
Row = tuple[str, str, "float | None", "float | None", str]


# --- timing --------------------------------------------------------------------------------------
async def measure(scenario: Scenario, n: int, rounds: int, warmup: int, wanted: set[str]) -> None:
    live = [v for v in scenario.variants if not v.na and v.name in wanted]
    for v in live:
        await scenario.block(v, warmup)
        if v.exporter is not None:
            v.exporter.poll_now()
    for r in range(rounds):
        k = r % len(live)
        for v in live[k:] + live[:k]:  # rotate who goes first
            gc.collect()
            v.samples.append(await scenario.block(v, n) / n)
            if v.exporter is not None:
                t0 = perf_ns()
                v.exporter.poll_now()  # fold this block's events, as the poll job would
                v.fold.append((perf_ns() - t0) / n)


def rows_of(scenarios: list[Scenario], wanted: set[str]) -> list[Row]:
    return [(s.title, v.name, statistics.median(v.samples) if v.samples else None,
             statistics.median(v.fold) if v.fold else None, v.na or ("" if v.samples else "not measured"))
            for s in scenarios for v in s.variants if v.name in wanted]


# --- instruction counts --------------------------------------------------------------------------
MARK = os.getppid  # a libc call nothing else here makes: callgrind dumps its counters at each one


async def count(scenario: Scenario, n: int, warmup: int, wanted: set[str], labels: list[dict]) -> None:
    """Child side: each block and each fold between two markers, in an order ``labels`` records."""
    for v in scenario.variants:
        if v.name not in wanted:
            continue
        if v.na:
            labels.append({"scenario": scenario.title, "variant": v.name, "na": v.na})
            continue
        await scenario.block(v, warmup)
        if v.exporter is not None:
            v.exporter.poll_now()
        gc.collect()
        MARK()
        await scenario.block(v, n)
        MARK()
        labels.append({"scenario": scenario.title, "variant": v.name, "what": "cycle", "n": n})
        if v.exporter is not None:
            MARK()
            v.exporter.poll_now()
            MARK()
            labels.append({"scenario": scenario.title, "variant": v.name, "what": "fold", "n": n})


def instructions(args: argparse.Namespace, sync_n: int, async_n: int) -> list[Row]:
    """Parent side: run the child under callgrind, pair its dumps with its labels."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("checkout.py: --instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="dbpool-bench-") as tmp:
        cmd = [valgrind, "--tool=callgrind", f"--dump-before={MARK.__name__}", "--dump-instr=no",
               f"--callgrind-out-file={tmp}/cg.%p", sys.executable, os.path.abspath(__file__), "--child",
               "-n", str(sync_n), "--warmup", str(args.warmup), "--variants", args.variants]
        cmd += ["--no-async"] if args.no_async else []
        # A fixed hash seed: dict and set layouts, hence instruction counts, repeat run to run.
        env = dict(os.environ, PYTHONHASHSEED="0", DBPOOL_TEST_DSN=args.dsn)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"checkout.py: the callgrind run failed: {tail}")
        labels = json.loads(done.stdout.strip().splitlines()[-1])
        dumps = sorted((p for p in os.listdir(tmp) if re.fullmatch(r"cg\.\d+\.\d+", p)),
                       key=lambda p: int(p.rsplit(".", 1)[1]))
        totals = [_total(os.path.join(tmp, p)) for p in dumps]
    # Dump 2k+1 holds what ran before marker pair k opened, dump 2k+2 what ran inside it.
    inside = totals[1::2]
    measured = [label for label in labels if "na" not in label]
    if len(inside) != len(measured):
        raise SystemExit(f"checkout.py: expected {len(measured)} callgrind dumps, found {len(inside)}")
    per: dict[tuple[str, str], dict[str, float]] = {}
    for label, total in zip(measured, inside, strict=True):
        per.setdefault((label["scenario"], label["variant"]), {})[label["what"]] = total / label["n"]
    rows: list[Row] = []
    for label in labels:
        key = (label["scenario"], label["variant"])
        if "na" in label:
            rows.append((*key, None, None, label["na"]))
        elif label["what"] == "cycle":
            rows.append((*key, per[key]["cycle"], per[key].get("fold"), ""))
    return rows


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"checkout.py: no totals in callgrind dump {os.path.basename(path)}")


# --- reporting -----------------------------------------------------------------------------------
def report(rows: list[Row], unit: str, scale: float, extra_unit: str) -> None:
    print(f"| scenario | variant | {unit}/cycle | × bare | + {extra_unit}/cycle | fold {extra_unit}/cycle "
          "(poll job) |")
    print("|---|---|---:|---:|---:|---:|")
    bare: dict[str, float | None] = {title: cost for title, name, cost, _, _ in rows if name == "bare"}
    seen: set[str] = set()
    for title, name, cost, fold, na in rows:
        label = "" if title in seen else title
        seen.add(title)
        base = bare.get(title)
        if cost is None:
            print(f"| {label} | {name} | n/a: {na} | | | |")
            continue
        ratio = f"{cost / base:.2f}×" if base else "—"
        extra = f"{cost - base:+,.0f}" if base is not None and name != "bare" else "—"
        folded = f"{fold:,.0f}" if fold is not None else "—"
        print(f"| {label} | {name} | {cost / scale:,.2f} | {ratio} | {extra} | {folded} |")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for dist in ("sqlalchemy", "psycopg", "psycopg-pool", "asyncpg", "opentelemetry-instrumentation-sqlalchemy",
                 "opentelemetry-sdk"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--iterations", "-n", type=int,
                   help="cycles per block (default 20000 timed, 2000 with --instructions; async: a quarter)")
    p.add_argument("--rounds", "-r", type=int, default=7, help="interleaved timed rounds per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2000, help="untimed cycles per variant first (default 2000)")
    p.add_argument("--dsn", default=os.environ.get("DBPOOL_TEST_DSN", DEFAULT_DSN),
                   help="libpq URL (default: $DBPOOL_TEST_DSN or %(default)s)")
    p.add_argument("--no-async", action="store_true", help="skip the asyncio scenarios")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (bare is always measured)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions under valgrind's callgrind instead of timing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations is None:
        args.iterations = 2000 if args.instructions else 20000
    if args.iterations < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--iterations and --rounds must be positive, --warmup not negative")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    return args


async def run(args: argparse.Namespace, sync_n: int, async_n: int) -> list[Row] | list[dict]:
    wanted = set(args.variants.split(",")) | {"bare"}
    scenarios, close = await build(args.dsn, wanted, with_async=not args.no_async)
    labels: list[dict] = []
    try:
        for s in scenarios:
            n = async_n if s.is_async else sync_n
            warmup = max(1, args.warmup // 4) if s.is_async else args.warmup
            if args.child:
                await count(s, n, warmup, wanted, labels)
            else:
                await measure(s, n, args.rounds, warmup, wanted)
    finally:
        await close()
    return labels if args.child else rows_of(scenarios, wanted)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # asyncio cycles cost more than sync ones: fewer of them keep the run short.
    sync_n, async_n = args.iterations, max(1, args.iterations // 4)
    try:
        import psycopg

        psycopg.connect(args.dsn, connect_timeout=5).close()
    except Exception as e:  # one clear line, and never the DSN (it may hold a password)
        from dbpool_exporter.redact import scrub

        first = (scrub(str(e)).strip().splitlines() or [type(e).__name__])[0]
        print(f"checkout.py: cannot connect to the benchmark server: {first}", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(asyncio.run(run(args, sync_n, async_n))))
        return 0
    started = time.monotonic()
    if args.instructions:
        rows = instructions(args, sync_n, async_n)
        what = f"instructions (callgrind) over {sync_n} cycles (async: {async_n}), per cycle"
    else:
        rows = asyncio.run(run(args, sync_n, async_n))  # type: ignore[assignment]
        what = f"median of {args.rounds} interleaved rounds × {sync_n} cycles (async: {async_n})"
    print(f"# checkout+checkin cost: {what}")
    print(f"# {versions()}; {os.cpu_count()} CPUs; {platform.platform()}")
    print()
    if args.instructions:
        report(rows, "instructions", 1.0, "instr.")
    else:
        report(rows, "µs", 1000.0, "ns")
    print()
    print(f"# took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
