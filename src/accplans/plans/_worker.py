"""Long computations (model ORMs, fits, tracking) in a worker process, awaited by the plan.

pyAT and heavy numpy hold the GIL: run in the RunEngine's process they would freeze its event
loop (monitors, pause, abort, suspenders). ``compute`` sends the call to a worker process and
the plan waits on it like on any other future.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from bluesky.utils import MsgGenerator

from accplans.devices import call_async

__all__ = ["compute", "shutdown_workers"]

T = TypeVar("T")
_executor: ProcessPoolExecutor | None = None


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start worker processes without the caller's ``__main__``.

    A spawned child normally re-imports the parent's main script or module (as
    ``__mp_main__``): a script without an ``if __name__ == "__main__":`` guard (a tutorial, a
    user's script, ``python -m accplans.cli``) would run again in the worker, start twins and
    servers, and break the pool. The worker only runs importable library functions, so it
    needs nothing from ``__main__``.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    with _main_hidden():  # the pool starts its process on the first submit
        return _pool().submit(fn, *args)


def _pool() -> ProcessPoolExecutor:
    global _executor
    if _executor is None:
        # spawn: a forked child would inherit the RunEngine's threads and EPICS contexts
        _executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        atexit.register(shutdown_workers)
    return _executor


def shutdown_workers() -> None:
    """Stop the worker process (it is started again on the next ``compute``)."""
    global _executor
    if _executor is not None:
        _executor.shutdown(wait=True, cancel_futures=True)
        _executor = None


def compute(fn: Callable[..., T], *args: Any, timeout: float | None = None) -> MsgGenerator[T]:
    """Run ``fn(*args)`` in the worker process and return its result (a plan stub).

    ``fn`` and its arguments must be picklable (module-level functions, arrays, descriptions).
    """
    try:
        future: Future[T] = _submit(fn, *args)
    except BrokenProcessPool:  # a worker died (killed, out of memory): start a new one
        shutdown_workers()
        future = _submit(fn, *args)
    if timeout is None:
        return cast(T, (yield from call_async(asyncio.wrap_future, future)))
    return (yield from call_async(lambda: asyncio.wait_for(asyncio.wrap_future(future), timeout)))
