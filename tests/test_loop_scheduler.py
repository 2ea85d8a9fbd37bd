"""The daemon's own scheduler (poller.LoopScheduler): what the Poller needs of APScheduler, on asyncio timers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dbpool_exporter.poller import LoopScheduler


def test_first_run_at_once_no_overlap_and_a_failing_job_keeps_its_schedule(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        scheduler = LoopScheduler(asyncio.get_running_loop())
        first = asyncio.Event()
        slow_runs, inside, most_inside = 0, 0, 0
        failing_runs = 0

        async def slow() -> None:  # takes 4 intervals: ticks missed meanwhile are skipped, not queued
            nonlocal slow_runs, inside, most_inside
            slow_runs += 1
            inside += 1
            most_inside = max(most_inside, inside)
            first.set()
            await asyncio.sleep(0.2)
            inside -= 1

        def failing() -> None:  # a plain function runs in a thread, as under AsyncIOScheduler
            nonlocal failing_runs
            failing_runs += 1
            raise RuntimeError("poll failed")

        scheduler.add_job(failing, "interval", seconds=0.05, id="failing")
        scheduler.add_job(slow, "interval", seconds=3600, id="hourly")  # first run now, not in an hour
        await asyncio.wait_for(first.wait(), 10)
        scheduler.remove_job("hourly")
        while inside:  # its run under way finishes (another job id may run the same function at once)
            await asyncio.sleep(0.01)
        scheduler.add_job(slow, "interval", seconds=0.05, id="slow")
        for _ in range(200):
            if slow_runs >= 4 and failing_runs >= 3:
                break
            await asyncio.sleep(0.05)
        scheduler.shutdown()
        assert most_inside == 1, "a job overlapped itself"
        assert slow_runs >= 4 and failing_runs >= 3, (slow_runs, failing_runs)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert "job failing raised an exception" in caplog.text


def test_a_job_removed_while_it_runs_finishes_and_does_not_run_again() -> None:
    async def main() -> None:
        scheduler = LoopScheduler(asyncio.get_running_loop())
        started, release = asyncio.Event(), asyncio.Event()
        runs, finished = 0, 0

        async def job() -> None:
            nonlocal runs, finished
            runs += 1
            started.set()
            await release.wait()
            finished += 1

        scheduler.add_job(job, "interval", seconds=0.01, id="job")
        await asyncio.wait_for(started.wait(), 10)
        scheduler.remove_job("job")
        assert scheduler.get_job("job") is None
        release.set()
        for _ in range(100):
            if finished:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # ten intervals: a job still scheduled would have run again
        assert (runs, finished) == (1, 1)
        with pytest.raises(KeyError):
            scheduler.remove_job("job")

    asyncio.run(main())


def test_ids_are_unique_unless_replaced_and_shutdown_cancels_runs() -> None:
    async def main() -> None:
        scheduler = LoopScheduler(asyncio.get_running_loop())
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def hang() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        scheduler.add_job(hang, "interval", seconds=1, id="poll:app")
        with pytest.raises(ValueError, match="already scheduled"):
            scheduler.add_job(hang, "interval", seconds=1, id="poll:app")
        with pytest.raises(ValueError, match="positive interval"):
            scheduler.add_job(hang, "interval", seconds=0, id="other")
        await asyncio.wait_for(started.wait(), 10)
        scheduler.shutdown()
        await asyncio.wait_for(cancelled.wait(), 10)
        assert scheduler.get_job("poll:app") is None

    asyncio.run(main())


def test_a_job_cancelled_from_inside_keeps_its_schedule() -> None:
    # A poll that times out inside itself raises CancelledError; APScheduler logs it and polls again.
    async def main() -> None:
        scheduler = LoopScheduler(asyncio.get_running_loop())
        runs = 0

        async def job() -> None:
            nonlocal runs
            runs += 1
            raise asyncio.CancelledError

        scheduler.add_job(job, "interval", seconds=0.01, id="job")
        for _ in range(500):
            if runs >= 3:
                break
            await asyncio.sleep(0.01)
        scheduler.shutdown()
        assert runs >= 3, f"the job stopped after {runs} run(s)"

    asyncio.run(main())


def test_replacing_a_running_job_waits_for_its_run() -> None:
    async def main() -> None:
        scheduler = LoopScheduler(asyncio.get_running_loop())
        inside, most_inside, runs = 0, 0, 0
        release = asyncio.Event()

        async def job() -> None:
            nonlocal inside, most_inside, runs
            runs += 1
            inside += 1
            most_inside = max(most_inside, inside)
            await release.wait()
            inside -= 1

        scheduler.add_job(job, "interval", seconds=0.01, id="chore")
        while not inside:
            await asyncio.sleep(0.01)
        scheduler.add_job(job, "interval", seconds=0.01, id="chore", replace_existing=True)
        await asyncio.sleep(0.1)
        assert (most_inside, runs) == (1, 1), "the replacement ran beside the run it replaced"
        release.set()
        for _ in range(500):
            if runs >= 2:
                break
            await asyncio.sleep(0.01)
        scheduler.shutdown()
        assert (most_inside, runs >= 2) == (1, True)

    asyncio.run(main())
