"""The child process of :class:`~accplans.data.ProcessTiledWriter` (``python -m`` this module).

Reads pickled ``(name, doc)`` pairs from stdin and hands them to a
:class:`~accplans.data.BackgroundTiledWriter`; answers flush and close requests with pickled
``(request, failures)`` on the original stdout, which nothing else may write to (the module
sends ``sys.stdout`` to stderr).
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import IO, Any

from ._writer import BackgroundTiledWriter, TiledWriteError

_FLUSH, _CLOSE, _READY = "__accplans_flush__", "__accplans_close__", "__accplans_ready__"
_KEY_ENV = "ACCPLANS_WRITER_TILED_API_KEY"


def _serve(uri: str, api_key: str | None, batch_size: int, docs: IO[bytes], out: IO[bytes]) -> None:
    """The child: a BackgroundTiledWriter fed with pickled documents, answering on ``out``."""
    from tiled.client import from_uri

    def reply(*message: Any) -> None:
        pickle.dump(message, out)
        out.flush()

    try:
        writer = BackgroundTiledWriter(from_uri(uri, api_key=api_key), batch_size=batch_size)
    except Exception as exc:
        reply("error", f"cannot write to Tiled at {uri}: {exc!r}")
        return
    reply(_READY, [])
    while True:
        try:
            name, doc = pickle.load(docs)
        except EOFError:  # the RunEngine's process closed the pipe or died: write what we have
            writer.close(timeout=60.0)
            return
        if name not in (_FLUSH, _CLOSE):
            writer(name, doc)
            continue
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
        reply(name, failures)
        if name == _CLOSE:
            return


def main() -> None:
    """Entry point: ``python -m accplans.data._writer_child URI BATCH_SIZE``."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library that prints must not corrupt the replies
    sys.stdout = sys.stderr
    _serve(sys.argv[1], os.environ.get(_KEY_ENV), int(sys.argv[2]), sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
