"""The acquire and release hooks of every pool kind, sync and async: one template, rendered per shape.

A source instruments a pool by shadowing its acquire and release methods with instance attributes
that call the class's own (deleting the attributes restores the pool exactly). Each hook is one
Python frame doing the ``Recorder``'s hot-path bookkeeping inline: a Python call is a sizeable
share of a checkout (bench/checkout.py), so the bookkeeping cannot sit behind another call.
Like psycopg_pool's ``pool.py``, generated from ``pool_async.py``, the sync and async twins are
written once: the templates below are rendered with or without ``async``/``await`` and with the
pool's own parameter names, compiled once per shape, and keep their line numbers here, so a
traceback through a hook points into this file.
"""

from __future__ import annotations

import sys
from functools import cache
from time import perf_counter
from typing import Any, Callable

from .recorder import Recorder

# The rendered code's globals: a module global is found faster than time.perf_counter.
_GLOBALS: dict[str, Any] = {"__name__": __name__, "_now": perf_counter}
# The first line of each template (right after the line naming it), so tracebacks point into it.
_ACQUIRE_LINE = sys._getframe().f_lineno + 2
_ACQUIRE = """\
def factory(original, recorder, timeout_error):
    waiting, queued, waits, out = recorder.waiting, recorder.queued, recorder.waits, recorder.out
    queue, failed, acquired = recorder.queue, recorder.acquire_failed, recorder.acquired

    {async_}def acquire({params}):
        started = _now()
        waiting.append(None)
        inside = len(out) + len(waiting)
        if inside > recorder.full_gate:  # the pool is full: this caller queues
            queue(inside, started)
        try:
            conn = {await_}original({args})
        except timeout_error:
            failed(started, True)
            raise
        except BaseException:
            failed(started, False)
            raise
        now = _now()
        waiting.pop()
        if queued:
            queued.discard(started)
        waits.append(now - started)
        held = len(out)
        if held < recorder.acquired_gate:
            out[{conn_key}] = now
        else:  # a new peak since the last poll, or a pool busy enough to name its holders
            out[{conn_key}] = acquired(held, now)
        return conn

    return acquire
"""
_RELEASE_LINE = sys._getframe().f_lineno + 2
_RELEASE = """\
def factory(original, recorder):
    holds, out, released, late = recorder.holds, recorder.out, recorder.released_checkout, recorder.released_late

    {async_}def release({params}):
        checkout = out.pop({last_key}, None)
        if checkout.__class__ is float:
            holds.append(_now() - checkout)
        elif checkout is not None:
            released(checkout)
        {missed}
        {pass_on}

    return release
"""


def acquire_hook(original: Callable[..., Any], recorder: Recorder, timeout_error: type[BaseException], *,
                 is_async: bool = False, params: str = "", key: str = "", by_object: bool = False,
                 ) -> Callable[..., Any]:
    """A stand-in for ``original`` (a bound acquire method) that times every acquire.

    ``params``: the method's parameters, passed on as they came (``"timeout=None"``); ``key``: the
    attribute of what it returns that names the checkout the release will name too ("" for itself).
    ``timeout_error`` is the pool's own, counted apart from other failures. ``by_object``: key the
    checkout by that object itself rather than its ``id()``; see ``Recorder.unpin``.
    """
    factory = _render(_ACQUIRE, _ACQUIRE_LINE, is_async, params, key, by_object=by_object)
    return factory(original, recorder, timeout_error)


def release_hook(original: Callable[..., Any] | None, recorder: Recorder, *, is_async: bool = False,
                 params: str = "conn", key: str = "", by_object: bool = False) -> Callable[..., Any]:
    """A stand-in for ``original`` (a bound release method) that ends the checkout its last parameter names.

    ``original=None`` makes an event listener, which has nothing to pass the release on to.
    """
    factory = _render(_RELEASE, _RELEASE_LINE, is_async, params, key, original is not None, by_object)
    return factory(original, recorder)


@cache
def _render(template: str, line: int, is_async: bool, params: str, key: str, pass_on: bool = True,
            by_object: bool = False) -> Any:
    if key and not key.isidentifier():
        raise ValueError(f"hook key must be an attribute name, got {key!r}")
    names = [p.split("=", 1)[0].strip() for p in params.split(",") if p.strip()]
    if not all(n.isidentifier() for n in names):
        raise ValueError(f"hook parameters must be names with defaults, got {params!r}")
    await_ = "await " if is_async else ""
    args = ", ".join(names)

    def checkout_key(name: str) -> str:
        named = f"{name}.{key}" if key else name
        return named if by_object else f"id({named})"

    source = template.format(async_="async " if is_async else "", await_=await_, params=params, args=args,
                             conn_key=checkout_key("conn"), last_key=checkout_key(names[-1] if names else ""),
                             pass_on=f"{await_}original({args})" if pass_on else "pass",
                             # Keyed by the object, a checkout held across a poll sits under a weak key.
                             missed=f"else: late({checkout_key(names[-1])})" if by_object and names else "")
    namespace: dict[str, Any] = {}
    # Blank lines first, so the rendered code's line numbers are the template's in this file.
    exec(compile("\n" * (line - 1) + source, __file__, "exec"), _GLOBALS, namespace)
    return namespace["factory"]
