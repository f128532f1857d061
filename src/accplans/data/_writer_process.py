"""The background writer in a child process: the RunEngine's process only hands documents over.

:class:`BackgroundTiledWriter` writes from a thread of the RunEngine's process; that thread's
Python work (normalising documents, encoding arrays, HTTP) competes with the RunEngine for the
GIL. Measured on the EBS twin (``benchmarks/orm.py``, 1152 ORM steps): the RunEngine took 13.6
ms more per step with the writer subscribed than without, two thirds of its own cost. Here the
callback only puts ``(name, doc)`` on a ``multiprocessing`` queue (pickled by the queue's feeder
thread); a child process runs a :class:`BackgroundTiledWriter` with its own Tiled client.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from typing import Any

from ._writer import BackgroundTiledWriter, TiledWriteError, WriteFailure

__all__ = ["ProcessTiledWriter"]

logger = logging.getLogger(__name__)

_FLUSH, _CLOSE = "__accplans_flush__", "__accplans_close__"


def _serve(uri: str, api_key: str | None, batch_size: int, docs: Any, replies: Any) -> None:
    """The child process: a BackgroundTiledWriter fed from ``docs``, answering on ``replies``."""
    from tiled.client import from_uri

    parent = os.getppid()
    try:
        writer = BackgroundTiledWriter(from_uri(uri, api_key=api_key), batch_size=batch_size)
    except Exception as exc:
        replies.put(("error", f"cannot write to Tiled at {uri}: {exc!r}"))
        return
    replies.put(("ready", None))
    while True:
        try:
            name, doc = docs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the RunEngine's process died: write what we have
                writer.close(timeout=60.0)
                return
            continue
        if name in (_FLUSH, _CLOSE):
            failures: list[str] = []
            try:
                if name == _FLUSH:
                    writer.flush(timeout=doc)
                else:
                    writer.close(timeout=doc)
            except TiledWriteError as exc:
                failures = [str(f) for f in exc.failures]
            except Exception as exc:  # a timeout, a dead thread: report it, never hide it
                failures = [repr(exc)]
            replies.put((name, failures))
            if name == _CLOSE:
                return
        else:
            writer(name, doc)


class ProcessTiledWriter:
    """A RunEngine callback writing runs to Tiled from a child process.

    Same layout in Tiled and same failure reporting as :class:`BackgroundTiledWriter` (which
    runs in the child): :meth:`flush` and :meth:`close` raise :class:`TiledWriteError` for
    writes that failed since the last report.

    Args:
        uri: the Tiled server (``http://127.0.0.1:PORT/api/v1``).
        api_key: a key that may write.
        batch_size: largest number of events per stream in one write.
        start_timeout: longest wait for the child to connect to Tiled (s).
    """

    def __init__(
        self,
        uri: str,
        api_key: str | None,
        *,
        batch_size: int = 1000,
        start_timeout: float = 120.0,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._docs = context.Queue()
        self._replies = context.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._process = context.Process(
            target=_serve,
            args=(uri, api_key, batch_size, self._docs, self._replies),
            name="accplans-tiled-writer",
            daemon=True,
        )
        self._process.start()
        try:
            status, message = self._replies.get(timeout=start_timeout)
        except queue.Empty:
            self._process.kill()
            raise TimeoutError(
                f"the Tiled writer process did not start in {start_timeout} s"
            ) from None
        if status != "ready":
            self._process.join(5)
            raise ConnectionError(message)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """RunEngine callback: hand the document to the writer process."""
        if self._closed:
            raise RuntimeError("ProcessTiledWriter is closed")
        self._docs.put((name, doc))

    def _request(self, what: str, timeout: float | None) -> None:
        with self._lock:
            if not self._process.is_alive():
                raise RuntimeError("the Tiled writer process has died; see its log")
            self._docs.put((what, timeout))
            wait = None if timeout is None else timeout + 30.0
            try:
                answer, failures = self._replies.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"the Tiled writer process did not answer in {wait} s") from None
        assert answer == what
        if failures:
            raise TiledWriteError([WriteFailure(None, what, RuntimeError(f)) for f in failures])

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every document handed over before this call is written.

        Raises:
            TimeoutError: not everything was written within ``timeout`` s.
            TiledWriteError: writes failed since the last report.
        """
        self._request(_FLUSH, timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write everything handed over, stop the child process. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._request(_CLOSE, timeout)
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._docs.close()
            self._replies.close()

    def __enter__(self) -> ProcessTiledWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not hide the exception in flight behind a write failure
            self.close()
        except Exception:
            logger.exception("ProcessTiledWriter: failures while closing")
