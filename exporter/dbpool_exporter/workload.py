"""An app-like asyncio workload for the demo: bounded concurrent requests through two real pools."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

# The seed's incident: the endpoint got slow, requests piled up behind a 20+40 pool and waited
# its 30 s timeout. Scaled down: the app pool is 4+8 with a 5 s timeout, and during an incident
# requests hold their connection for 2-4 s while up to INCIDENT_WORKERS of them are in flight.
INCIDENT_WORKERS = 48
NORMAL_HOLD = (0.05, 0.5)
INCIDENT_HOLD = (2.0, 4.0)
CHECKPOINTER_WORKERS = 2


@dataclass
class Stats:
    """What the workload saw, as an application log would: successes and failures by cause."""

    ok: int = 0
    queuepool_timeouts: int = 0
    psycopg_timeouts: int = 0
    other_errors: int = 0
    first_queuepool_timeout: str | None = None


def normal_load(t: float) -> tuple[int, tuple[float, float]]:
    """Concurrent app requests and their hold time at ``t`` seconds: a calm wave of 1..9."""
    return round(5 + 4 * math.sin(2 * math.pi * t / 60)), NORMAL_HOLD


def incident_load(t: float) -> tuple[int, tuple[float, float]]:
    """A 120 s cycle: 3 s calm, ramp to exhaustion over 10 s, 60 s saturated, back to calm."""
    t %= 120
    if t < 3 or t >= 90:
        return 4, NORMAL_HOLD
    if t < 13:
        return 4 + round((INCIDENT_WORKERS - 4) * (t - 3) / 10), INCIDENT_HOLD
    if t < 73:
        return INCIDENT_WORKERS, INCIDENT_HOLD
    return 4 + round((INCIDENT_WORKERS - 4) * (90 - t) / 17), NORMAL_HOLD


class Workload:
    """Worker tasks that each behave like one in-flight HTTP request at a time.

    Worker ``i`` only sends requests while ``i`` is below the load shape's target, so the number
    of concurrent requests follows the shape and never exceeds the number of workers.
    """

    def __init__(self, engine: Any, pool: Any, *, incident: bool, say: Callable[[str], None]) -> None:
        self.engine = engine
        self.pool = pool
        self.shape = incident_load if incident else normal_load
        self.max_workers = INCIDENT_WORKERS if incident else 9
        self.say = say
        self.stats = Stats()
        self.target = 0
        self.hold = NORMAL_HOLD
        self._started = 0.0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._started = time.monotonic()
        self._retarget()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._controller())]
        self._tasks += [loop.create_task(self._app_worker(i)) for i in range(self.max_workers)]
        self._tasks += [loop.create_task(self._checkpointer_worker()) for _ in range(CHECKPOINTER_WORKERS)]

    async def stop(self, grace: float = 1.5) -> None:
        """Let requests in flight finish for ``grace`` seconds, then cancel the rest."""
        self._stopping.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _retarget(self) -> None:
        self.target, self.hold = self.shape(time.monotonic() - self._started)

    async def _controller(self) -> None:
        while not self._stopping.is_set():
            self._retarget()
            await self._pause(0.5)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _app_worker(self, index: int) -> None:
        from sqlalchemy import exc, text

        query = text("SELECT pg_sleep(:seconds)")
        while not self._stopping.is_set():
            if index >= self.target:
                await self._pause(0.25)
                continue
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(query, {"seconds": random.uniform(*self.hold)})
            except exc.TimeoutError as e:
                self.stats.queuepool_timeouts += 1
                if self.stats.first_queuepool_timeout is None:
                    # Printed the way it reached the seed's logs, so it is recognisable.
                    self.stats.first_queuepool_timeout = f"sqlalchemy.exc.TimeoutError: {e}"
                    self.say(f"request failed: {self.stats.first_queuepool_timeout}")
            except Exception as e:
                self._other_error(e)
            else:
                self.stats.ok += 1
            await self._pause(random.uniform(0.0, 0.2))

    async def _checkpointer_worker(self) -> None:
        from psycopg_pool import PoolTimeout

        while not self._stopping.is_set():
            try:
                async with self.pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(%s)", (random.uniform(0.02, 0.2),))
            except PoolTimeout:
                self.stats.psycopg_timeouts += 1
            except Exception as e:
                self._other_error(e)
            else:
                self.stats.ok += 1
            await self._pause(random.uniform(0.2, 1.0))

    def _other_error(self, error: Exception) -> None:
        from .redact import scrub

        self.stats.other_errors += 1
        if self.stats.other_errors == 1:
            first_line = (str(error).strip().splitlines() or [""])[0]
            self.say(f"request failed: {type(error).__name__}: {scrub(first_line)}")
