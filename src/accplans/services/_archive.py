"""The archiver: machine signals sampled at a fixed rate into Tiled tables, through a disk spool.

``accplans archive`` (:func:`run_archiver`) connects to the machine, samples the configured
signals (DCCT, RF, tunes, the orbit, magnet setpoints) at ``rate_hz`` with ophyd-async reads in
an asyncio loop and writes every sample first to a local spool (SQLite in WAL mode, one
committed row per sample), then, from a thread, appends them in batches to Tiled:

- one appendable table per UTC day, ``<container>/<YYYY-MM-DD>``, one row per sample: ``seq``
  (a sequence number that never repeats, across restarts of the archiver too), ``time`` (epoch
  s), then for each signal group ``<group>_ok`` (1 when read, 0 when not) and its values
  (float, NaN when the group could not be read or a BPM reading is not valid);
- a row leaves the spool only once Tiled has it. While Tiled is away the spool grows, and
  drains when it is back. After a failed append (Tiled may have kept the rows without
  answering) the archiver reads back which ``seq`` Tiled holds before sending again, so every
  acquired sample arrives exactly once;
- when the machine (or the twin) is away, samples keep coming (each waits up to 0.5 s for its
  reads, so the rate drops meanwhile) as rows with ``<group>_ok = 0`` and NaN values: a gap,
  not a crash; when no group could be read, the archiver drops its CA channels so that a
  restarted IOC is found again at once.

:func:`query` returns a time range as a pandas DataFrame.

Rate budget (docs/how-to/archive-signals.md, measured by benchmarks/archive.py on 2 cores):
25 Hz of the EBS orbit (2 x 320 values) and the scalars, ~16 000 values/s, with no missed
sampling period and ~0.13 core; the ceiling is ~50 000-75 000 values/s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from accplans.devices import Machine

__all__ = [
    "ArchiveConfig",
    "ArchiveSignal",
    "Archiver",
    "ArchiverStats",
    "Spool",
    "load_archive_config",
    "query",
    "run_archiver",
]

_log = logging.getLogger(__name__)

#: Longest wait for one group's read (s), or the sampling period if longer: a loaded host
#: can delay a read by tens of ms, and a read that misses this is a gap in the archive.
_READ_TIMEOUT = 0.5
#: Samples whose reads may overlap (each started on schedule).
_MAX_IN_FLIGHT = 8
#: After a failed read, CA channels are dropped at most this often (s).
_RECONNECT_PERIOD = 1.0
#: Most rows per append when the spool holds a backlog (after an outage of Tiled).
_CATCH_UP_ROWS = 2000
#: Wait between attempts to reach Tiled (s).
_RETRY_PERIOD = 0.5


# -- configuration ----------------------------------------------------------------------------
class ArchiveSignal(BaseModel):
    """A group of signals: a device or family of the machine by name.

    ``dcct`` (current mA, lifetime h), ``rf`` (frequency readback Hz, voltage V), ``tune``
    (x, y), a BPM family such as ``bpms`` (x and y of every BPM, m, NaN where not valid, and the
    frame counter), or a magnet family such as ``hcorr`` (hardware setpoints, A; ``select``
    chooses members by name).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    select: list[str] | None = None


class ArchiveConfig(BaseModel):
    """What ``accplans archive`` records, how often, and where it spools.

    Attributes:
        signals: the signal groups (names, or ``{name: hcorr, select: [...]}``).
        rate_hz: samples per second.
        batch_rows: rows per Tiled append: a batch is sent when it has this many rows, or
            when its oldest row is ``batch_period_s`` old; a backlog (after an outage of Tiled)
            goes in appends of up to 2000 rows.
        batch_period_s: the longest a row waits for its batch (s).
        spool: the spool directory (created if missing).
        container: the Tiled container of the day tables.
    """

    model_config = ConfigDict(extra="forbid")

    signals: list[ArchiveSignal] = Field(min_length=1)
    rate_hz: float = Field(gt=0, le=1000)
    batch_rows: int = Field(default=100, ge=1)
    batch_period_s: float = Field(default=1.0, gt=0)
    spool: Path = Path(".accplans/archive-spool")
    container: str = "archive"

    @field_validator("signals", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


def load_archive_config(path: str | Path) -> ArchiveConfig:
    """Read an :class:`ArchiveConfig` from YAML; errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"archive config {path}: {exc}") from None
    try:
        return ArchiveConfig.model_validate(data)
    except Exception as exc:
        raise ValueError(f"archive config {path}: {exc}") from None


# -- signal groups ----------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9_]")


def _column(*parts: str) -> str:
    return "_".join(_SAFE.sub("_", p) for p in parts)


@dataclass
class _Group:
    """One signal group: its columns (after ``<name>_ok``) and an async reader."""

    name: str
    columns: list[str]
    units: list[str]
    read: Callable[[], Awaitable[np.ndarray]]
    #: number of values this group reads per sample (waveforms count every element)
    values: int = 0


def _groups(machine: Machine, signals: Sequence[ArchiveSignal]) -> list[_Group]:
    """The readers of ``signals`` on ``machine``; an unknown name raises ``ValueError``."""
    groups: list[_Group] = []
    seen: set[str] = set()
    for sig in signals:
        name = sig.name
        if name in seen:
            raise ValueError(f"archive signals: {name!r} is listed twice")
        seen.add(name)
        single = {"dcct": machine.dcct, "rf": machine.rf, "tune": machine.tune}
        if name in single:
            dev = single[name]
            if dev is None:
                raise ValueError(f"archive signals: the machine has no {name}")
            if sig.select is not None:
                raise ValueError(f"archive signals: {name} takes no select")
            groups.append(_single_group(name, dev))
            continue
        if name not in machine.families:
            known = ["dcct", "rf", "tune", *machine.families]
            raise ValueError(f"archive signals: unknown signal {name!r}; known: {known}")
        groups.append(_family_group(name, machine.families[name], sig.select))
    return groups


def _single_group(name: str, dev: Any) -> _Group:
    if name == "dcct":
        signals, fields, units = [dev.current, dev.lifetime], ["current", "lifetime"], ["mA", "h"]
    elif name == "rf":
        signals = [dev.frequency.readback, dev.voltage]
        fields, units = ["frequency", "voltage"], ["Hz", "V"]
    else:
        signals, fields, units = [dev.x, dev.y], ["x", "y"], ["", ""]

    async def read() -> np.ndarray:
        return np.array(await asyncio.gather(*(s.get_value() for s in signals)), float)

    return _Group(name, [_column(name, f) for f in fields], units, read, len(signals))


def _family_group(name: str, family: Any, select: list[str] | None) -> _Group:
    names = list(family.names)
    if select is not None:
        unknown = sorted(set(select) - set(names))
        if unknown:
            raise ValueError(f"archive signals: {name} has no members {unknown}")
        index = np.array([names.index(s) for s in select], dtype=int)
    else:
        index = np.arange(len(names))
    members = [names[i] for i in index]
    if hasattr(family, "read_orbit"):  # a BPM family: the orbit frame

        async def read_orbit() -> np.ndarray:
            frame = await family.read_orbit()
            ok = np.asarray(frame.valid, bool)[index]
            x = np.where(ok, np.asarray(frame.x, float)[index], np.nan)
            y = np.where(ok, np.asarray(frame.y, float)[index], np.nan)
            return np.concatenate([x, y, [float(frame.counter)]])

        columns = [_column(name, "x", m) for m in members] + [
            _column(name, "y", m) for m in members
        ]
        return _Group(
            name,
            [*columns, _column(name, "counter")],
            ["m"] * len(columns) + [""],
            read_orbit,
            2 * len(members),
        )

    sel = None if select is None else list(members)

    async def read_setpoints() -> np.ndarray:
        return np.asarray(await family.hardware_setpoints(sel), float)

    return _Group(
        name,
        [_column(name, m) for m in members],
        ["A"] * len(members),
        read_setpoints,
        len(members),
    )


# -- the spool --------------------------------------------------------------------------------
class Spool:
    """Samples on local disk until Tiled has them (SQLite, WAL; one committed row per sample).

    Args:
        directory: where ``spool.sqlite`` lives (created if missing).
        columns: the value columns of a row (after ``seq`` and ``time``); a spool written with
            other columns is refused (drain it or move it away first).
    """

    def __init__(self, directory: str | Path, columns: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "spool.sqlite"
        self.columns = list(columns)
        self._db = self.connect()
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS rows (seq INTEGER PRIMARY KEY, time REAL, data BLOB)"
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'columns'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('columns', ?)", (json.dumps(self.columns),)
                )
                self._db.execute("INSERT INTO meta VALUES ('next_seq', '0')")
            elif json.loads(row[0]) != self.columns:
                pending = self.pending()
                if pending:
                    raise ValueError(
                        f"spool {self.path} holds {pending} rows of another signal configuration: "
                        "run the archiver with its old configuration until it drains, or move it"
                    )
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'columns'", (json.dumps(self.columns),)
                )
        self.next_seq = int(
            self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        )

    def connect(self) -> sqlite3.Connection:
        """A new connection (one per thread)."""
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable against a crash of this process
        return db

    def append(self, t: float, values: np.ndarray) -> int:
        """Store one sample (``values`` in :attr:`columns` order); return its ``seq``."""
        seq = self.next_seq
        data = np.ascontiguousarray(values, dtype="<f8").tobytes()
        with self._db:
            self._db.execute("INSERT INTO rows VALUES (?, ?, ?)", (seq, t, data))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(seq + 1),))
        self.next_seq = seq + 1
        return seq

    def pending(self, db: sqlite3.Connection | None = None) -> int:
        """Rows not yet in Tiled."""
        return int((db or self._db).execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    @staticmethod
    def oldest(db: sqlite3.Connection, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``n`` oldest rows: ``(seq, time, values)``."""
        rows = db.execute("SELECT seq, time, data FROM rows ORDER BY seq LIMIT ?", (n,)).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 0))
        seq = np.array([r[0] for r in rows], dtype=np.int64)
        t = np.array([r[1] for r in rows], dtype=float)
        values = np.array([np.frombuffer(r[2], dtype="<f8") for r in rows]).reshape(len(rows), -1)
        return seq, t, values

    @staticmethod
    def discard(db: sqlite3.Connection, upto: int) -> None:
        """Forget the rows up to ``seq`` ``upto`` (Tiled has them)."""
        with db:
            db.execute("DELETE FROM rows WHERE seq <= ?", (upto,))

    def close(self) -> None:
        """Close the spool's connection."""
        self._db.close()


# -- the archiver -----------------------------------------------------------------------------
@dataclass
class ArchiverStats:
    """Counters of a running archiver (read them from any thread).

    Attributes:
        acquired: samples taken (rows spooled).
        complete: samples in which every group was read.
        failed_reads: group reads that failed (a row with ``<group>_ok = 0``).
        late: sampling periods missed because a sample took longer than the period.
        sent: rows Tiled has (appended by this archiver).
        send_errors: failed appends (Tiled away or failing).
        last_seq: ``seq`` of the last sample.
        read_s: total time samples waited for their reads (s; samples overlap).
    """

    acquired: int = 0
    complete: int = 0
    failed_reads: int = 0
    late: int = 0
    sent: int = 0
    send_errors: int = 0
    last_seq: int = -1
    read_s: float = 0.0
    changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def wait(self, predicate: Callable[[ArchiverStats], bool], timeout: float = 60.0) -> None:
        """Block until ``predicate(self)`` holds; ``TimeoutError`` after ``timeout`` s."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"archiver: condition not met within {timeout} s ({self!r})")

    def bump(self, **changes: Any) -> None:
        with self.changed:
            for k, v in changes.items():
                setattr(self, k, getattr(self, k) + v)
            self.changed.notify_all()


class Archiver:
    """Sample ``config.signals`` of ``machine`` into the spool and drain it to Tiled.

    ``await archiver.run(stop)`` samples until ``stop`` is set (in the machine's event loop);
    a thread drains the spool to Tiled meanwhile, and once more at the end (up to
    ``final_drain_s``); rows Tiled could not take stay in the spool for the next run.

    Args:
        machine: the connected machine.
        config: what to record.
        tiled: ``() -> Tiled client`` (root container, able to write); called again after
            every failure, so it may fail while Tiled is away.
        metadata: added to every day table's metadata (e.g. the machine identity).
    """

    def __init__(
        self,
        machine: Machine,
        config: ArchiveConfig,
        tiled: Callable[[], Any],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.machine = machine
        self.config = config
        self.groups = _groups(machine, config.signals)
        self.columns: list[str] = []
        self.units: dict[str, str] = {"seq": "", "time": "s"}
        self._ok: list[int] = []  # where each group's ``<group>_ok`` is in a row
        for g in self.groups:
            self._ok.append(len(self.columns))
            self.columns.append(f"{g.name}_ok")
            self.columns.extend(g.columns)
            self.units.update(zip(g.columns, g.units, strict=True))
        self.values_per_sample = sum(g.values for g in self.groups)
        self.spool = Spool(config.spool, self.columns)
        self.stats = ArchiverStats(last_seq=self.spool.next_seq - 1)
        self._tiled_factory = tiled
        self._metadata = dict(metadata or {})
        self._stop_drain = threading.Event()
        self._drain_thread: threading.Thread | None = None
        self._last_reconnect = 0.0

    # -- sampling ------------------------------------------------------------------------------
    async def sample(self) -> tuple[float, np.ndarray]:
        """Read every group once: ``(time, row values)``; failed groups give ok 0 and NaN."""
        t = time.time()
        timeout = max(_READ_TIMEOUT, 1.0 / self.config.rate_hz)
        results = await asyncio.gather(
            *(asyncio.wait_for(g.read(), timeout) for g in self.groups), return_exceptions=True
        )
        parts: list[np.ndarray] = []
        failed = 0
        for g, r in zip(self.groups, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                failed += 1
                parts.append(np.concatenate([[0.0], np.full(len(g.columns), np.nan)]))
            else:
                parts.append(np.concatenate([[1.0], np.asarray(r, float).ravel()]))
        if failed:
            self.stats.bump(failed_reads=failed)
            if failed == len(self.groups):  # the IOC is away (not just slow)
                self._reconnect()
        return t, np.concatenate(parts)

    def _reconnect(self) -> None:
        """Drop the CA channels (at most every second): a restarted IOC is searched at once."""
        now = time.monotonic()
        if now - self._last_reconnect < _RECONNECT_PERIOD:
            return
        self._last_reconnect = now
        with contextlib.suppress(ImportError):
            import aioca

            aioca.purge_channel_caches()

    async def _timed_sample(self) -> tuple[float, np.ndarray, float]:
        t0 = time.perf_counter()
        t, values = await self.sample()
        return t, values, time.perf_counter() - t0

    def _store(self, t: float, values: np.ndarray, read_s: float) -> None:
        seq = self.spool.append(t, values)
        self.stats.read_s += read_s
        self.stats.bump(acquired=1, complete=int(np.all(values[self._ok] == 1.0)))
        with self.stats.changed:
            self.stats.last_seq = seq

    async def run(self, stop: asyncio.Event) -> ArchiverStats:
        """Sample at ``config.rate_hz`` until ``stop`` is set; drain to Tiled meanwhile.

        Samples start on schedule even while earlier ones still wait for their reads (up to
        :data:`_MAX_IN_FLIGHT`), so a slow answer of the IOC delays a sample, not the rate;
        they are spooled in the order they started (``seq`` follows ``time``).
        """
        self.start_drain()
        period = 1.0 / self.config.rate_hz
        next_t = time.monotonic()
        inflight: collections.deque[asyncio.Task[tuple[float, np.ndarray, float]]]
        inflight = collections.deque()
        try:
            while not stop.is_set():
                inflight.append(asyncio.create_task(self._timed_sample()))
                while inflight and (inflight[0].done() or len(inflight) >= _MAX_IN_FLIGHT):
                    self._store(*(await inflight.popleft()))
                next_t += period
                delay = next_t - time.monotonic()
                if delay < 0:
                    missed = math.floor(-delay / period) + 1
                    self.stats.bump(late=missed)
                    next_t += missed * period
                    delay = next_t - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, delay))
            while inflight:
                self._store(*(await inflight.popleft()))
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.to_thread(self.stop_drain)
        return self.stats

    # -- draining ------------------------------------------------------------------------------
    def start_drain(self) -> None:
        """Start the thread that appends the spool to Tiled."""
        if self._drain_thread is None:
            self._stop_drain.clear()
            self._drain_thread = threading.Thread(
                target=self._drain_loop, name="accplans-archive-drain", daemon=True
            )
            self._drain_thread.start()

    def stop_drain(self, final_drain_s: float = 10.0) -> None:
        """Stop the drain thread after one last attempt to send what is spooled."""
        self._final_deadline = time.monotonic() + final_drain_s
        self._stop_drain.set()
        if self._drain_thread is not None:
            self._drain_thread.join(timeout=final_drain_s + 30)
            self._drain_thread = None

    _final_deadline = math.inf

    def _drain_loop(self) -> None:
        db = self.spool.connect()
        drain = _Drainer(self, db)
        try:
            while True:
                stopping = self._stop_drain.is_set()
                if stopping and time.monotonic() > self._final_deadline:
                    break
                try:
                    sent = drain.step(force=stopping)
                except Exception as exc:  # Tiled away or failing: keep the rows, retry
                    self.stats.bump(send_errors=1)
                    _log.warning("archive: append to Tiled failed (%s); rows stay spooled", exc)
                    drain.reset()
                    if stopping:
                        time.sleep(_RETRY_PERIOD)
                    else:
                        self._stop_drain.wait(_RETRY_PERIOD)
                    continue
                if sent:
                    self.stats.bump(sent=sent)
                    continue
                if stopping and self.spool.pending(db) == 0:
                    break
                if not stopping:
                    self._stop_drain.wait(min(0.1, self.config.batch_period_s))
        finally:
            drain.close()
            db.close()


class _Drainer:
    """The drain thread's state: the Tiled client, the day tables, what Tiled already has."""

    def __init__(self, archiver: Archiver, db: sqlite3.Connection) -> None:
        self.a = archiver
        self.db = db
        self.client: Any = None
        self.tables: dict[str, Any] = {}
        self.uncertain = True  # before the first append, and after any failure: check Tiled

    def reset(self) -> None:
        self.close()
        self.client = None
        self.tables = {}
        self.uncertain = True

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.context.close()

    def step(self, *, force: bool) -> int:
        """Send the next batch if one is due; return the rows sent (0: nothing due)."""
        cfg = self.a.config
        seq, t, values = Spool.oldest(self.db, max(cfg.batch_rows, _CATCH_UP_ROWS))
        if seq.size == 0:
            return 0
        if not force and seq.size < cfg.batch_rows and time.time() - t[0] < cfg.batch_period_s:
            return 0
        if self.client is None:
            self.client = self.a._tiled_factory()
        days = np.array([_day(x) for x in t])
        first = days[0]
        chunk = days == first  # one day table per append
        seq, t, values = seq[chunk], t[chunk], values[chunk]
        table = self._table(first)
        if self.uncertain:
            have = _seqs_in(table)
            keep = ~np.isin(seq, have)
            if not np.all(keep):
                _log.info("archive: Tiled already has %d of the spooled rows", int((~keep).sum()))
                Spool.discard(self.db, int(seq[~keep].max()))
            seq, t, values = seq[keep], t[keep], values[keep]
            self.uncertain = False
            if seq.size == 0:
                return 0
        table.append_partition(0, _frame(self.a.columns, seq, t, values))
        Spool.discard(self.db, int(seq[-1]))
        return int(seq.size)

    def _table(self, day: str) -> Any:
        if day in self.tables:
            return self.tables[day]
        root = self.client
        key = self.a.config.container
        if key not in root:
            root.create_container(key, metadata={"kind": "accplans-archive"})
        container = root[key]
        if day in container:
            table = container[day]
            have = list(table.columns)
            want = ["seq", "time", *self.a.columns]
            if have != want:
                raise ValueError(
                    f"archive table {key}/{day} has other columns than this configuration "
                    f"({len(have)} vs {len(want)}); use another container"
                )
        else:
            table = container.create_appendable_table(
                _schema(self.a.columns),
                key=day,
                metadata={
                    "kind": "accplans-archive-day",
                    "day": day,
                    "units": self.a.units,
                    "groups": [g.name for g in self.a.groups],
                    "rate_hz": self.a.config.rate_hz,
                    **self.a._metadata,
                },
            )
        self.tables[day] = table
        return table


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")


def _schema(columns: list[str]) -> Any:
    import pyarrow as pa

    return pa.schema(
        [("seq", pa.int64()), ("time", pa.float64())] + [(c, pa.float64()) for c in columns]
    )


def _frame(columns: list[str], seq: np.ndarray, t: np.ndarray, values: np.ndarray) -> Any:
    """The rows as an Arrow table (a DataFrame would send its index as a column)."""
    import pyarrow as pa

    arrays = [pa.array(seq.astype(np.int64)), pa.array(t)]
    arrays += [pa.array(values[:, j]) for j in range(len(columns))]
    return pa.Table.from_arrays(arrays, schema=_schema(columns))


def _seqs_in(table: Any) -> np.ndarray:
    """Every ``seq`` a day table holds (read after a failed append)."""
    try:
        df = table.read(columns=["seq"])
    except Exception as exc:
        if "empty" in str(exc).lower() or "404" in str(exc):
            return np.array([], dtype=np.int64)
        raise
    return np.asarray(df["seq"], dtype=np.int64) if len(df) else np.array([], dtype=np.int64)


# -- reading back -----------------------------------------------------------------------------
def _epoch(x: float | dt.datetime | str) -> float:
    if isinstance(x, dt.datetime):
        return (x if x.tzinfo else x.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(x, str):
        return _epoch(dt.datetime.fromisoformat(x))
    return float(x)


def query(
    client: Any,
    start: float | dt.datetime | str,
    stop: float | dt.datetime | str,
    signals: Sequence[str] | None = None,
    *,
    container: str = "archive",
) -> Any:
    """The archived samples with ``start <= time < stop``, as a pandas DataFrame.

    Args:
        client: a Tiled client (root container).
        start: epoch (s), a datetime (naive: UTC) or an ISO string.
        stop: same.
        signals: group names (``"dcct"``: every ``dcct_*`` column with ``dcct_ok``) or column
            names; all columns by default.
        container: the archive's container.

    Returns:
        Columns ``seq``, ``time`` (epoch s) and the chosen signals, one row per sample in
        ``seq`` order, indexed by UTC timestamp.
    """
    import pandas as pd

    t0, t1 = _epoch(start), _epoch(stop)
    if t1 < t0:
        raise ValueError(f"query: stop ({stop}) is before start ({start})")
    node = client[container]
    first = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d")
    last = dt.datetime.fromtimestamp(t1, dt.UTC).strftime("%Y-%m-%d")
    days = sorted(k for k in node if _DAY.fullmatch(k) and first <= k <= last)
    frames = []
    for key in days:
        table = node[key]
        columns = list(table.columns)
        if signals is not None:
            chosen = ["seq", "time"]
            for s in signals:
                match = [c for c in columns if c == s or c.startswith(f"{s}_")]
                if not match:
                    raise ValueError(f"query: no archived column for {s!r} in {container}/{key}")
                chosen += [c for c in match if c not in chosen]
            columns = chosen
        df = table.read(columns=columns)[columns]
        frames.append(df[(df["time"] >= t0) & (df["time"] < t1)])
    if not frames:
        return pd.DataFrame(columns=["seq", "time", *(signals or [])])
    out = pd.concat(frames).sort_values("seq").reset_index(drop=True)
    out.index = pd.to_datetime(out["time"], unit="s", utc=True)
    out.index.name = "timestamp"
    return out


# -- the service ------------------------------------------------------------------------------
def run_archiver(
    machine: Machine,
    config: ArchiveConfig,
    tiled: Callable[[], Any],
    stop: asyncio.Event,
    *,
    metadata: dict[str, Any] | None = None,
) -> Awaitable[ArchiverStats]:
    """``Archiver(machine, config, tiled).run(stop)``: await it in the machine's loop."""
    return Archiver(machine, config, tiled, metadata=metadata).run(stop)
