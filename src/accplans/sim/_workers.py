"""The twin's worker processes: long computations (tracking, emittances) off the IOC's loop.

Each worker pool is one spawned process (never fork a process that runs EPICS server
threads). A stopping twin does not wait for a running job: :func:`stop_pool` cancels what is
queued and terminates the workers, so that a twin told to stop (or whose parent died) exits
in about the time its IOC takes, not after a tracking or emittance job of seconds to minutes.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

__all__ = ["stop_pool", "worker_pool"]


def worker_pool() -> ProcessPoolExecutor:
    """A pool of one spawned worker process."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the pool's queued jobs and terminate its workers, without waiting for a job."""
    # the live workers, before shutdown forgets them (a CPython attribute since 3.8)
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()
