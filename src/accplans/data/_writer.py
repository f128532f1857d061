"""A Tiled writer that never makes the RunEngine wait.

bluesky-tiled-plugins' ``TiledWriter`` runs on the RunEngine's callback path, and each write to
Tiled costs tens of milliseconds of server-side catalog work (ECOSYSTEM.md: 60-90 ms per event
with ``batch_size=1``), so a plan that writes each event stalls. Its batching (``batch_size=N``)
is cheap per event but holds data back until N events or the end of the run, so nothing is
live.

:class:`BackgroundTiledWriter` keeps the cheap part on the RunEngine's path (the callback only
puts the document on a queue) and runs ``TiledWriter``'s own per-run machinery (its document
normalizer and run writer, so the layout in Tiled is exactly ``TiledWriter``'s: ``BlueskyRun``
v3, zarr for arrays of more than ``max_array_size`` elements, external assets through its
consolidators) on a background thread. That thread writes *whatever has queued since its last
write*: one table append plus one array extend per stream. When the RunEngine is fast, batches
grow by themselves; when it is idle, each event is written as it comes, so data stay live.

The one piece of ``TiledWriter`` that is not public is "write the cached rows now"; it is kept in
:func:`_flush_run_writer`, checked against the installed version when the module loads.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bluesky_tiled_plugins.writing import tiled_writer as _tw
from event_model import DocumentNames

__all__ = ["BackgroundTiledWriter", "TiledWriteError", "WriteFailure"]

logger = logging.getLogger(__name__)

# The (non-public) parts of bluesky-tiled-plugins' TiledWriter used here. Checked at import so an
# incompatible release fails loudly, not in the middle of a run.
_RunWriter: Any = getattr(_tw, "_RunWriter", None)
_RunNormalizer: Any = getattr(_tw, "RunNormalizer", None)
_REQUIRED_RUN_WRITER_ATTRS = (
    "_write_internal_data",
    "_write_external_data",
    "_close_stream_tree",
    "_internal_dims",
)
if (
    _RunWriter is None
    or _RunNormalizer is None
    or not all(hasattr(_RunWriter, a) for a in _REQUIRED_RUN_WRITER_ATTRS)
):  # pragma: no cover - only with an incompatible bluesky-tiled-plugins
    raise ImportError(
        "accplans.data.BackgroundTiledWriter needs bluesky-tiled-plugins 2.0.x "
        "(bluesky_tiled_plugins.writing.tiled_writer._RunWriter with "
        f"{_REQUIRED_RUN_WRITER_ATTRS}); the installed version does not provide them"
    )


class _DistinctDimsRunWriter(_RunWriter):  # type: ignore[misc, valid-type]
    """The run writer, with distinct names for equal-sized axes of one array.

    bluesky-tiled-plugins 2.0 names an internal array's axes after their sizes (``dim_int_k``,
    shared across the stream), so a square array (an ORM with 2 nbpm = ncorr, a hand-over
    matrix) gets the same name on two axes and does not load back as an xarray variable. A
    repeated name within one array is made unique by its axis (``dim_int_k_axis``).
    """

    def _internal_dims(self, desc_name: str, shape: tuple[int | None, ...]) -> tuple[str, ...]:
        dims = list(super()._internal_dims(desc_name, shape))
        seen: set[str] = set()
        for axis, name in enumerate(dims):
            if name in seen:
                dims[axis] = f"{name}_{axis}"
            seen.add(dims[axis])
        return tuple(dims)


@dataclass(frozen=True)
class WriteFailure:
    """One failure of the background writer.

    Attributes:
        run_uid: Uid of the run whose document failed (``None`` if it could not be routed).
        document: Name of the document being written (``"event"``, ``"stop"``, ``"flush"``...).
        error: The exception.
        time: When it happened (s since the epoch).
    """

    run_uid: str | None
    document: str
    error: BaseException
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return f"run {self.run_uid}: writing {self.document!r} failed: {self.error!r}"


class TiledWriteError(RuntimeError):
    """The background writer failed to write some documents to Tiled.

    Attributes:
        failures: What failed, in order.
    """

    def __init__(self, failures: list[WriteFailure]) -> None:
        self.failures = list(failures)
        lines = "\n  ".join(str(f) for f in self.failures[:10])
        more = f"\n  ... and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
        super().__init__(f"{len(self.failures)} Tiled write failure(s):\n  {lines}{more}")


_CLOSE = object()


class _Normalizer(_RunNormalizer):
    """TiledWriter's normalizer without the per-event JSON-schema check.

    The RunEngine composes events from a validated descriptor; checking each one again with
    jsonschema costs ~4 ms per event of this thread's time (most of the writer's CPU), which
    competes for the GIL with the RunEngine. Other documents are still checked.
    """

    def emit(self, name: Any, doc: Any) -> None:
        if name == DocumentNames.event:
            self.dispatcher.process(name, doc)
        else:
            super().emit(name, doc)


class _RunPipeline:
    """One run: TiledWriter's normalizer feeding its run writer, plus failure bookkeeping."""

    def __init__(
        self,
        client: Any,
        start_doc: dict[str, Any],
        *,
        batch_size: int,
        max_array_size: int,
        record: Callable[[str | None, str, BaseException], None],
    ) -> None:
        self.uid: str = start_doc["uid"]
        self.normalizer = _Normalizer()
        self.run_writer = _DistinctDimsRunWriter(
            client, batch_size=batch_size, max_array_size=max_array_size
        )
        self.normalizer.subscribe(self.run_writer)
        self._record = record
        self.failed: BaseException | None = None
        self.stopped = False
        self.stream_of_descriptor: dict[str, str] = {}
        self.num_events: Counter[str] = Counter()
        self.dirty = False

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self.stream_of_descriptor[doc["uid"]] = doc["name"]
        elif name == "event":
            self.num_events[self.stream_of_descriptor.get(doc["descriptor"], "?")] += 1
        elif name == "event_page":
            n = len(doc["seq_num"])
            self.num_events[self.stream_of_descriptor.get(doc["descriptor"], "?")] += n
        if name == "stop":
            self.stopped = True
        if self.failed is not None:
            if name == "stop":
                self._stop_after_failure(doc)
            return
        try:
            self.normalizer(name, doc)
            self.dirty = name != "stop"
        except Exception as exc:
            self._fail(name, exc)
            if name == "stop":
                self._stop_after_failure(doc)

    def flush(self) -> None:
        """Write the rows cached since the last flush (one append/extend per stream)."""
        if not self.dirty or self.failed is not None or self.stopped:
            return
        try:
            _flush_run_writer(self.run_writer)
            self.dirty = False
        except Exception as exc:
            self._fail("flush", exc)

    def _fail(self, name: str, exc: BaseException) -> None:
        self.failed = exc
        self._record(self.uid, name, exc)

    def _stop_after_failure(self, doc: dict[str, Any]) -> None:
        """Record the stop document (and the failure) in a run whose writing failed earlier."""
        root = self.run_writer.root_node
        if root is None:
            return  # the run's container was never created: nothing to attach the stop to
        note = (
            f"accplans BackgroundTiledWriter: writing failed ({self.failed!r}); data may be partial"
        )
        try:
            stop = {k: v for k, v in doc.items() if not k.startswith("_")}
            root.update_metadata(metadata={"stop": stop, "notes": [note]}, drop_revision=True)
        except Exception as exc:
            self._record(self.uid, "stop", exc)
            return
        try:
            self.run_writer._close_stream_tree()
        except Exception as exc:
            self._record(self.uid, "stop", exc)


def _flush_run_writer(run_writer: Any) -> None:
    """Write everything a TiledWriter run writer has cached, as its ``stop`` does (minus stop)."""
    for desc_name, cache in run_writer._internal_data_cache.items():
        if cache:
            run_writer._write_internal_data(cache, desc_node=run_writer._desc_nodes[desc_name])
            cache.clear()
    pending = run_writer._external_data_cache
    for sres_uid in list(pending):
        run_writer._write_external_data(pending.pop(sres_uid))


class BackgroundTiledWriter:
    """A RunEngine callback that writes runs to Tiled from a background thread.

    ``RE.subscribe(writer)``: the callback only enqueues the document (microseconds); a thread
    writes whatever has queued since its last write, through bluesky-tiled-plugins'
    ``TiledWriter`` machinery (same layout in Tiled, readable by the Tiled client and
    databroker 2).

    Failures are never silent: each is logged when it happens, kept in :attr:`failures`, raised
    by the next :meth:`flush` (or :meth:`close`) as :class:`TiledWriteError`, and, if still
    unreported when the next run starts, logged again and recorded in that run's metadata
    (``writer_failures_before_run``). A run whose writing failed still gets its stop document
    (exit status, reason) and a note; its data written before the failure remain. A run still
    open when the writer closes gets a stop document with ``exit_status="fail"``.

    Args:
        container: Tiled container to write runs into (a client from ``tiled.client.from_uri``
            with a key that may write, or a node under it).
        batch_size: Largest number of events per stream in one write (bounds request size).
        max_array_size: Arrays with more elements go to zarr array nodes, smaller ones into the
            event table. Default 0: every array goes to zarr, because arrays kept in the table
            (``TiledWriter``'s default keeps up to 16 elements there) read back through the
            stream's ``read()`` as strings of their repr, and 2-D ones fail to write. Never -1.
        name: Name of the background thread.
    """

    def __init__(
        self,
        container: Any,
        *,
        batch_size: int = 1000,
        max_array_size: int = 0,
        name: str = "accplans-tiled-writer",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_array_size < 0:
            raise ValueError(
                f"max_array_size must be >= 0, got {max_array_size} (-1 breaks array shapes)"
            )
        self._client = container.include_data_sources()
        self._batch_size = batch_size
        self._max_array_size = max_array_size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._enqueued = 0
        self._done = 0
        self._closed = False
        self._failures: list[WriteFailure] = []
        self._unreported: list[WriteFailure] = []
        self._stats: dict[str, float] = dict.fromkeys(
            ("batches", "documents", "busy_s", "largest_batch"), 0
        )
        self._runs: dict[str, _RunPipeline] = {}
        self._run_of_descriptor: dict[str, str] = {}
        self._run_of_resource: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- RunEngine side ---------------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Enqueue one document (the RunEngine callback). Never blocks on Tiled.

        Raises:
            RuntimeError: The writer is closed or its thread has died.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"BackgroundTiledWriter is closed; cannot write {name!r}")
            if not self._thread.is_alive():
                raise RuntimeError("BackgroundTiledWriter's thread has died; see the log")
            self._enqueued += 1
            unreported = list(self._unreported) if name == "start" else []
        self._queue.put((name, doc))
        if unreported:
            logger.error(
                "run %s starts while earlier Tiled write failures are unreported: %s",
                doc.get("uid"),
                "; ".join(str(f) for f in unreported),
            )

    # -- user API ---------------------------------------------------------------------------
    @property
    def failures(self) -> list[WriteFailure]:
        """Every failure since the writer was created (reported or not)."""
        with self._cond:
            return list(self._failures)

    @property
    def pending(self) -> int:
        """Documents enqueued and not yet written."""
        with self._cond:
            return self._enqueued - self._done

    def stats(self) -> dict[str, float]:
        """Counters of the writer thread.

        Returns:
            ``documents`` written, ``batches`` (writes), ``busy_s`` (time spent writing, s),
            ``largest_batch`` (documents in the largest write).
        """
        with self._cond:
            return dict(self._stats)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every document enqueued before this call is written.

        Args:
            timeout: Longest wait, s (``None``: no limit).

        Raises:
            TimeoutError: Not everything was written within ``timeout``.
            TiledWriteError: Writes failed since the last flush (they are then reported).
        """
        with self._cond:
            target = self._enqueued
            ok = self._cond.wait_for(
                lambda: self._done >= target or not self._thread.is_alive(), timeout
            )
            if self._done < target:
                if not ok:
                    raise TimeoutError(
                        f"BackgroundTiledWriter: {target - self._done} document(s) still "
                        f"unwritten after {timeout} s"
                    )
                raise RuntimeError("BackgroundTiledWriter's thread has died; see the log")
        self._raise_unreported()

    def close(self, timeout: float | None = 60.0) -> None:
        """Write everything queued, stop the thread, and report unreported failures.

        Runs still open get a stop document with ``exit_status="fail"``. Idempotent.

        Args:
            timeout: Longest wait for the queue to drain, s.

        Raises:
            TimeoutError: The thread did not finish within ``timeout``.
            TiledWriteError: Writes failed and were not reported by :meth:`flush`.
        """
        with self._cond:
            already = self._closed
            self._closed = True
        if not already:
            self._queue.put(_CLOSE)
            atexit.unregister(self._atexit)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"BackgroundTiledWriter did not finish within {timeout} s")
        self._raise_unreported()

    def __enter__(self) -> BackgroundTiledWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not hide the exception in flight behind a write failure
            self.close()
        except Exception:
            logger.exception("BackgroundTiledWriter: failures while closing")

    def _atexit(self) -> None:
        try:
            self.close(timeout=30.0)
        except Exception:
            logger.exception("BackgroundTiledWriter: failures at interpreter exit")

    def _raise_unreported(self) -> None:
        with self._cond:
            unreported, self._unreported = self._unreported, []
        if unreported:
            raise TiledWriteError(unreported)

    # -- background thread ------------------------------------------------------------------
    def _record(self, run_uid: str | None, document: str, exc: BaseException) -> None:
        failure = WriteFailure(run_uid, document, exc)
        logger.error("BackgroundTiledWriter: %s", failure, exc_info=exc)
        with self._cond:
            self._failures.append(failure)
            self._unreported.append(failure)

    def _loop(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            t0 = time.perf_counter()
            n_docs = 0
            for item in batch:
                if item is _CLOSE:
                    closing = True
                    continue
                n_docs += 1
                try:
                    self._route(*item)
                except Exception as exc:  # routing bugs must not kill the thread
                    self._record(None, str(item[0]), exc)
            if closing:
                self._stop_open_runs()
            for run in list(self._runs.values()):
                run.flush()
            self._forget_stopped_runs()
            busy = time.perf_counter() - t0
            with self._cond:
                self._done += n_docs
                self._stats["batches"] += 1
                self._stats["documents"] += n_docs
                self._stats["busy_s"] += busy
                self._stats["largest_batch"] = max(self._stats["largest_batch"], n_docs)
                self._cond.notify_all()

    def _route(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self._start(doc)
            return
        run_uid: str | None
        if name in ("stop", "descriptor"):
            run_uid = doc["run_start"]
        elif name in ("event", "event_page", "stream_datum"):
            run_uid = self._run_of_descriptor.get(doc["descriptor"])
        elif name in ("resource", "stream_resource"):
            run_uid = doc.get("run_start") or self._only_open_run(name)
            if run_uid is not None:
                self._run_of_resource[doc["uid"]] = run_uid
        elif name in ("datum", "datum_page"):
            run_uid = self._run_of_resource.get(doc["resource"])
        else:
            raise ValueError(f"unknown document type {name!r}")
        run = self._runs.get(run_uid) if run_uid is not None else None
        if run is None:
            raise LookupError(f"{name!r} document belongs to no open run (run {run_uid})")
        if name == "descriptor":
            self._run_of_descriptor[doc["uid"]] = run.uid
        run(name, doc)

    def _only_open_run(self, name: str) -> str | None:
        open_runs = [uid for uid, run in self._runs.items() if not run.stopped]
        if len(open_runs) != 1:
            raise LookupError(f"{name!r} document without run_start and {len(open_runs)} open runs")
        return open_runs[0]

    def _start(self, doc: dict[str, Any]) -> None:
        with self._cond:
            before = [str(f) for f in self._unreported]
        run = _RunPipeline(
            self._client,
            doc,
            batch_size=self._batch_size,
            max_array_size=self._max_array_size,
            record=self._record,
        )
        self._runs[run.uid] = run
        run("start", doc)
        if before and run.failed is None and run.run_writer.root_node is not None:
            try:
                run.run_writer.root_node.update_metadata(
                    metadata={"writer_failures_before_run": before}, drop_revision=True
                )
            except Exception as exc:
                self._record(run.uid, "start", exc)

    def _stop_open_runs(self) -> None:
        for run in self._runs.values():
            if run.stopped:
                continue
            logger.error("BackgroundTiledWriter closed while run %s was open: stopping it", run.uid)
            run(
                "stop",
                {
                    "uid": str(uuid.uuid4()),
                    "time": time.time(),
                    "run_start": run.uid,
                    "exit_status": "fail",
                    "reason": "accplans BackgroundTiledWriter closed before the run's stop",
                    "num_events": dict(run.num_events),
                },
            )

    def _forget_stopped_runs(self) -> None:
        stopped = {uid for uid, run in self._runs.items() if run.stopped}
        if not stopped:
            return
        for uid in stopped:
            del self._runs[uid]
        for table in (self._run_of_descriptor, self._run_of_resource):
            for key in [k for k, v in table.items() if v in stopped]:
                del table[key]
