"""The background writer in a child process: the RunEngine's process only hands documents over.

:class:`BackgroundTiledWriter` writes from a thread of the RunEngine's process; that thread's
Python work (normalising documents, encoding arrays, HTTP) competes with the RunEngine for the
GIL. Measured on the EBS twin (``benchmarks/orm.py``, 1152 ORM steps): the RunEngine took 13.6
ms more per step with the writer subscribed than without, two thirds of its own cost. Here the
callback only queues ``(name, doc)``; a feeder thread pickles it into the stdin of a child
process (``python -m accplans.data._writer_child``) that runs a :class:`BackgroundTiledWriter`
with its own Tiled client. The child is a plain subprocess, not ``multiprocessing``: a spawned
child re-imports the parent's ``__main__``, which in IPython or the queueserver is a startup
file that must not run twice.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import Any

from ._writer import TiledWriteError, WriteFailure
from ._writer_child import _CLOSE, _FLUSH, _KEY_ENV, _READY

__all__ = ["ProcessTiledWriter"]

logger = logging.getLogger(__name__)

_STOP = object()


class ProcessTiledWriter:
    """A RunEngine callback writing runs to Tiled from a child process.

    Same layout in Tiled and same failure reporting as :class:`BackgroundTiledWriter` (which
    runs in the child): :meth:`flush` and :meth:`close` raise :class:`TiledWriteError` for
    writes that failed since the last report.

    Args:
        uri: the Tiled server (``http://127.0.0.1:PORT/api/v1``).
        api_key: a key that may write (passed to the child through its environment).
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
        env = dict(os.environ)
        env.pop(_KEY_ENV, None)
        if api_key is not None:
            env[_KEY_ENV] = api_key
        cmd = [sys.executable, "-m", "accplans.data._writer_child", uri, str(batch_size)]
        self._process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(
            target=self._read_replies, name="tiled-writer-replies", daemon=True
        )
        self._reader.start()
        try:
            status, message = self._replies.get(timeout=start_timeout)
        except queue.Empty:
            self._kill()
            raise TimeoutError(
                f"the Tiled writer process did not start in {start_timeout} s"
            ) from None
        if status != _READY:
            self._kill()
            raise ConnectionError(message)
        self._feeder = threading.Thread(target=self._feed, name="tiled-writer-feeder", daemon=True)
        self._feeder.start()

    # -- threads -----------------------------------------------------------------------------
    def _read_replies(self) -> None:
        while True:
            try:
                self._replies.put(pickle.load(self._stdout))
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                self._replies.put(("died", ["the Tiled writer process ended"]))
                return

    def _feed(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _STOP:
                return
            try:
                pickle.dump(item, self._stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._stdin.flush()
            except (BrokenPipeError, OSError):
                logger.error("ProcessTiledWriter: the writer process is gone; %s lost", item[0])

    # -- RunEngine side ----------------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """RunEngine callback: hand the document to the writer process."""
        if self._closed:
            raise RuntimeError("ProcessTiledWriter is closed")
        self._outbox.put((name, doc))

    def _request(self, what: str, timeout: float | None) -> None:
        with self._lock:
            if self._process.poll() is not None:
                raise RuntimeError("the Tiled writer process has died; see its log (stderr)")
            self._outbox.put((what, timeout))
            wait = None if timeout is None else timeout + 30.0
            try:
                answer, failures = self._replies.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"the Tiled writer process did not answer in {wait} s") from None
        if answer != what:
            raise RuntimeError(f"the Tiled writer process answered {answer!r}: {failures}")
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
            self._outbox.put(_STOP)
            self._feeder.join(10)
            self._kill(grace=10.0)

    def _kill(self, grace: float = 0.0) -> None:
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(10)  # it ends at the end of the child's output
        self._stdout.close()

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
