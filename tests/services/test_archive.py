"""The archiver on its own small twin and its own Tiled server: outages of both lose nothing.

The archiver runs in this process, in its own event loop thread, at 20 Hz. The test stops
Tiled (the samples pile up in the spool), stops the twin (the samples become gaps: ``_ok = 0``
and NaN), restarts the twin on the same ports and Tiled on the same directory and port, stops
the archiver, and checks that every acquired sample is in Tiled exactly once (by ``seq``), that
the gaps are where the twin was away, and that the values are those the twin served.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioca
import numpy as np
import pytest

from accplans.config import load_description
from accplans.data import run_tiled_server
from accplans.devices import Machine, connect
from accplans.services import ArchiveConfig, Archiver, ArchiverStats, Spool, query
from accplans.sim import TwinPorts, run_twin
from tests.plans.helpers import renamed_description

RATE_HZ = 20.0
HCORR = ["HCM002", "HCM006"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """An archiver running in a thread of its own (its event loop), until :meth:`stop`."""

    def __init__(
        self, description: Any, ports: TwinPorts, config: ArchiveConfig, uri: str, key: str
    ) -> None:
        from tiled.client import from_uri

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.machine: Machine = self._call(
            connect(description, address=f"127.0.0.1:{ports.ca}", timeout=10)
        )
        self.archiver = Archiver(
            self.machine,
            config,
            lambda: from_uri(uri, api_key=key),
            metadata={"machine": description.machine.id},
        )
        self._stop = self._call(self._event())
        self.future = asyncio.run_coroutine_threadsafe(self.archiver.run(self._stop), self.loop)

    @property
    def stats(self) -> ArchiverStats:
        return self.archiver.stats

    async def _event(self) -> asyncio.Event:
        return asyncio.Event()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> ArchiverStats:
        if self.future is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            stats = self.future.result(timeout=120)
            self.future = None
            return stats
        return self.stats

    def close(self) -> None:
        try:
            self.stop()
        finally:

            async def purge() -> None:
                aioca.purge_channel_caches()

            self._call(purge())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()
            self.archiver.spool.close()


@pytest.fixture
def no_tiled_retries() -> Iterator[None]:
    """The archiver retries by itself; Tiled's client would retry a refused append for ~45 s."""
    import stamina

    stamina.set_active(False)
    yield
    stamina.set_active(True)


@pytest.fixture
def own_twin_description(tmp_path: Path) -> Path:
    return renamed_description(load_description("small"), "ARC", tmp_path)


def test_every_sample_reaches_tiled_once_across_tiled_and_twin_restarts(
    tmp_path: Path, twin_ports: TwinPorts, own_twin_description: Path, no_tiled_retries: None
) -> None:
    description = load_description(own_twin_description)
    config = ArchiveConfig.model_validate(
        {
            "signals": ["dcct", "rf", "tune", "bpms", {"name": "hcorr", "select": HCORR}],
            "rate_hz": RATE_HZ,
            "batch_rows": 10,
            "batch_period_s": 0.2,
            "spool": tmp_path / "spool",
        }
    )
    tiled_dir, port = tmp_path / "tiled", _free_port()
    served: dict[str, Any] = {}
    stack: list[Any] = []
    try:
        twin_cm = run_twin(own_twin_description, ports=twin_ports)
        twin = twin_cm.__enter__()
        stack.append(twin_cm)
        tiled_cm = run_tiled_server(tiled_dir, port)
        tiled = tiled_cm.__enter__()
        stack.append(tiled_cm)
        key = tiled.api_key
        rf_pv = description.device("RF").pvs["frequency_readback"]
        hcorr_pv = description.families["hcorr"].pvs["setpoint"]
        served["rf"] = float(twin.control.get(rf_pv))
        served["hcorr"] = np.asarray(twin.control.get(hcorr_pv), float)

        running = Running(description, twin_ports, config, tiled.uri, key)
        stack.append(running)
        s = running.stats
        s.wait(lambda st: st.sent >= 20)

        print(f"{time.monotonic():.1f} {s}")
        # Tiled goes away: sampling goes on, the rows stay spooled
        stack.remove(tiled_cm)
        os.kill(tiled.pid, signal.SIGKILL)  # a crash (SIGTERM waits for open connections)
        tiled_cm.__exit__(None, None, None)
        n = s.acquired
        s.wait(lambda st: st.acquired >= n + 30 and st.send_errors >= 1)
        assert s.sent < s.acquired

        print(f"{time.monotonic():.1f} {s}")
        # the twin goes away: gaps, not a crash
        stack.remove(twin_cm)
        os.kill(twin.pid, signal.SIGKILL)
        twin_cm.__exit__(None, None, None)
        n, failed = s.acquired, s.failed_reads
        s.wait(lambda st: st.acquired >= n + 10 and st.failed_reads >= failed + 5 * 5)
        print(f"{time.monotonic():.1f} {s}")
        # it comes back on the same ports
        twin_cm = run_twin(own_twin_description, ports=twin_ports)
        twin = twin_cm.__enter__()
        stack.append(twin_cm)
        complete = s.complete
        s.wait(lambda st: st.complete >= complete + 10)

        print(f"{time.monotonic():.1f} {s}")
        # Tiled comes back on the same directory and port
        tiled_cm = run_tiled_server(tiled_dir, port, api_key=key)
        tiled = tiled_cm.__enter__()
        stack.append(tiled_cm)
        db = running.archiver.spool.connect()
        s.wait(lambda st: st.sent >= n + 10 and Spool.pending(running.archiver.spool, db) < 20)
        db.close()
        print(f"{time.monotonic():.1f} {s}")
        stats = running.stop()
        print(f"\narchiver: {stats}")
        db = running.archiver.spool.connect()
        assert Spool.pending(running.archiver.spool, db) == 0
        db.close()

        client = tiled.client()
        df = query(client, 0, 4e9)
        only_dcct = query(client, 0, 4e9, ["dcct", "rf_frequency"])
        # a time range: exactly the samples with t0 <= time < t1, given as epoch or datetime
        # (between two samples: a datetime holds microseconds)
        times = df["time"].to_numpy()
        i, j = len(times) // 3, 2 * len(times) // 3
        t0, t1 = (float(times[k - 1] + times[k]) / 2 for k in (i, j))
        window = query(client, t0, t1)
        as_datetimes = query(
            client, dt.datetime.fromtimestamp(t0, dt.UTC), dt.datetime.fromtimestamp(t1, dt.UTC)
        )
        client.context.close()
    finally:
        for cm in reversed(stack):
            if isinstance(cm, Running):
                cm.close()
            else:
                cm.__exit__(None, None, None)

    # every sample exactly once
    seq = df["seq"].to_numpy()
    inside = (times >= t0) & (times < t1)
    assert 0 < inside.sum() < len(df)
    np.testing.assert_array_equal(window["seq"].to_numpy(), seq[inside])
    np.testing.assert_array_equal(window.to_numpy(), df[inside].to_numpy())
    np.testing.assert_array_equal(as_datetimes["seq"].to_numpy(), seq[inside])
    assert len(df) == stats.acquired
    np.testing.assert_array_equal(seq, np.arange(stats.acquired))
    chosen = ["seq", "time", "dcct_ok", "dcct_current", "dcct_lifetime", "rf_frequency"]
    assert list(only_dcct.columns) == chosen
    np.testing.assert_array_equal(only_dcct.to_numpy(), df[chosen].to_numpy())
    assert np.all(np.diff(df["time"].to_numpy()) > 0)
    # the twin's outage is one gap: nothing read, NaN
    oks = df[[c for c in df.columns if c.endswith("_ok")]].to_numpy()
    gap = np.all(oks == 0, axis=1)
    partial = np.any(oks == 0, axis=1) & ~gap  # a read slower than 0.5 s on a loaded host
    print(f"{gap.sum()} rows in the gap, {partial.sum()} rows with a late read")
    assert gap.sum() >= 5
    runs = np.flatnonzero(np.diff(gap.astype(int)) != 0)
    assert len(runs) == 2, f"one gap expected, transitions at {runs}"
    value_columns = [c for c in df.columns if c not in ("seq", "time") and not c.endswith("_ok")]
    assert np.all(np.isnan(df.loc[gap, value_columns].to_numpy()))
    bpm_columns = [c for c in df.columns if c.startswith(("bpms_x_", "bpms_y_"))]
    assert len(bpm_columns) == 2 * len(description.families["bpms"].devices)
    # the values are those the twin served
    rf_ok = df["rf_ok"].to_numpy() == 1
    np.testing.assert_array_equal(df.loc[rf_ok, "rf_frequency"], served["rf"])
    names = list(description.families["hcorr"].devices)
    hcorr_ok = df["hcorr_ok"].to_numpy() == 1
    for name in HCORR:
        column = df.loc[hcorr_ok, f"hcorr_{name}"].to_numpy()
        np.testing.assert_array_equal(column, served["hcorr"][names.index(name)])
    dcct_ok = df["dcct_ok"].to_numpy() == 1
    current = df["dcct_current"].to_numpy()
    assert np.all((current[dcct_ok] > 0) & (current[dcct_ok] <= 200.0))
    first_fill, second_fill = np.arange(len(df)) <= runs[0], np.arange(len(df)) > runs[1]
    for fill in (first_fill, second_fill):  # the current decays within a fill
        assert np.all(np.diff(current[fill & dcct_ok]) <= 0)
    bpms_ok = df["bpms_ok"].to_numpy() == 1
    bpm_x = df.loc[bpms_ok, [c for c in bpm_columns if c.startswith("bpms_x_")]].to_numpy()
    assert np.all(np.isfinite(bpm_x)) and np.all(np.abs(bpm_x) < 0.01)  # m


def test_a_bad_configuration_names_the_file_and_the_key(tmp_path: Path) -> None:
    from accplans.cli._main import build_parser
    from accplans.services import load_archive_config

    path = tmp_path / "archive.yml"
    path.write_text("signals: [dcct]\nrate_hz: -1\n")
    with pytest.raises(ValueError, match=r"(?s)archive\.yml.*rate_hz"):
        load_archive_config(path)
    path.write_text("signals: [dcct, {name: hcorr, select: [HCM002]}]\nrate_hz: 5\n")
    config = load_archive_config(path)
    assert [s.name for s in config.signals] == ["dcct", "hcorr"]
    args = build_parser().parse_args(
        [
            "archive",
            "--machine",
            "small",
            "--tiled",
            "http://127.0.0.1:1/api/v1",
            "--config",
            str(path),
        ]
    )
    assert args.func.__name__ == "archive_main"


def test_a_spool_with_rows_of_another_configuration_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a_ok", "a_x"])
    assert spool.append(1.0, np.array([1.0, 2.0])) == 0
    assert spool.append(2.0, np.array([0.0, np.nan])) == 1
    spool.close()
    with pytest.raises(ValueError, match="2 rows of another signal configuration"):
        Spool(tmp_path, ["b_ok", "b_x"])
    again = Spool(tmp_path, ["a_ok", "a_x"])  # the same configuration continues its sequence
    assert again.next_seq == 2 and again.pending() == 2
    again.close()


def test_the_archive_command_records_until_sigterm_and_drains(
    tmp_path: Path, twin_ports: TwinPorts, own_twin_description: Path
) -> None:
    """``accplans archive`` as an operator starts it (its own process, the key in the
    environment): after SIGTERM it exits 0 with every sample in Tiled once (``seq`` 0..n-1),
    the spool empty, and the values the twin serves."""
    import subprocess
    import sys

    description = load_description(own_twin_description)
    config = tmp_path / "archive.yml"
    spool = tmp_path / "spool"
    config.write_text(
        f"signals: [dcct, rf, {{name: hcorr, select: [{HCORR[0]}]}}]\n"
        f"rate_hz: 10\nbatch_rows: 5\nbatch_period_s: 0.2\nspool: {spool}\n"
    )
    with (
        run_twin(own_twin_description, ports=twin_ports) as twin,
        run_tiled_server(tmp_path / "tiled", _free_port()) as tiled,
    ):
        rf = float(twin.control.get(description.device("RF").pvs["frequency_readback"]))
        command = [
            *(sys.executable, "-m", "accplans.cli", "archive"),
            *("--machine", str(own_twin_description)),
            *("--address", f"127.0.0.1:{twin_ports.ca}"),
            *("--tiled", tiled.uri, "--config", str(config)),
        ]
        env = {**os.environ, "TILED_API_KEY": tiled.api_key}
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        client = tiled.client()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if "archive" in client and len(query(client, 0, 4e9)) >= 10:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()[0]
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            df = query(client, 0, 4e9)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            client.context.close()
    assert len(df) >= 10
    np.testing.assert_array_equal(df["seq"].to_numpy(), np.arange(len(df)))
    assert "0 rows left in the spool" in out, out
    ok = df["rf_ok"].to_numpy() == 1
    assert ok.sum() >= 0.9 * len(df)
    np.testing.assert_array_equal(df.loc[ok, "rf_frequency"], rf)
    assert list(df.columns) == [
        *("seq", "time", "dcct_ok", "dcct_current", "dcct_lifetime"),
        *("rf_ok", "rf_frequency", "rf_voltage", "hcorr_ok", f"hcorr_{HCORR[0]}"),
    ]
