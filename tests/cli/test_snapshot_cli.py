"""``accplans snapshot list|show|diff`` against a Tiled server holding save_setpoints runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import set_mock_value

from accplans.cli import main
from accplans.config import load_description
from accplans.data import BackgroundTiledWriter, LocalTiled
from accplans.devices import Machine
from accplans.plans import save_setpoints
from tests.plans.helpers import run_plan


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTiled]:
    with LocalTiled(tmp_path_factory.mktemp("tiled")) as server:
        yield server


@pytest.fixture(scope="module")
def saved(tiled: LocalTiled) -> Iterator[dict[str, Any]]:
    """Two snapshots of a mock small ring (correctors and RF) that differ in three setpoints."""
    engine = RunEngine({}, call_returns_result=True)
    client = tiled.client()
    writer = BackgroundTiledWriter(client)
    engine.subscribe(writer)
    try:
        machine = Machine(load_description("small"))
        call_in_bluesky_event_loop(machine.connect(mock=True))
        assert machine.rf is not None
        hcorr = np.linspace(-1.0, 1.0, len(machine.hcorr.names))
        set_mock_value(machine.hcorr.setpoint, hcorr)
        set_mock_value(machine.rf.frequency.setpoint, 352.2e6)
        families = [machine.hcorr, machine.vcorr, machine.rf]
        first = run_plan(engine, save_setpoints(*families, comment="before MD")).run_start_uids[0]
        hcorr2 = hcorr.copy()
        hcorr2[[2, 5]] += [0.125, -0.25]
        set_mock_value(machine.hcorr.setpoint, hcorr2)
        set_mock_value(machine.rf.frequency.setpoint, 352.2e6 + 40.0)
        second = run_plan(engine, save_setpoints(*families, comment="after MD")).run_start_uids[0]
        writer.flush(timeout=60)
        yield {
            "first": first,
            "second": second,
            "names": list(machine.hcorr.names),
            "hcorr": (hcorr, hcorr2),
        }
    finally:
        writer.close(timeout=60)
        engine.loop.call_soon_threadsafe(engine.loop.stop)
        engine._th.join(timeout=5)
        engine.loop.close()
        client.context.close()


def _run(tiled: LocalTiled, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["snapshot", "--tiled", tiled.uri, "--api-key", tiled.api_key, *args])
    return int(done.value.code or 0), capsys.readouterr().out


def test_list_shows_both_snapshots_newest_first(
    tiled: LocalTiled, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tiled, capsys, "list")
    assert code == 0, out
    lines = out.splitlines()
    assert saved["second"] in lines[1] and "after MD" in lines[1]
    assert saved["first"] in lines[2] and "before MD" in lines[2]
    assert "small-twin" in lines[1] and "hcorr,vcorr,RF" in lines[1]


def test_show_lists_every_setpoint_with_its_unit(
    tiled: LocalTiled, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tiled, capsys, "show", saved["first"])
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 24 + 24 + 1
    by_name = {r[0]: (r[1], r[2], float(r[3])) for r in rows}
    for name, value in zip(saved["names"], saved["hcorr"][0], strict=True):
        assert by_name[name][:2] == ("hcorr", "A")
        assert by_name[name][2] == pytest.approx(value, rel=1e-5, abs=1e-9)
    assert by_name["RF"] == ("RF", "Hz", pytest.approx(352.2e6))


def test_diff_lists_only_what_changed_with_its_delta(
    tiled: LocalTiled, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tiled, capsys, "diff", saved["first"], saved["second"])
    assert code == 0, out
    assert "3 setpoint(s) differ" in out
    rows = {r.split()[0]: r.split() for r in out.splitlines()[4:]}
    names = saved["names"]
    assert set(rows) == {names[2], names[5], "RF"}
    assert float(rows[names[2]][5]) == pytest.approx(0.125)
    assert float(rows[names[5]][5]) == pytest.approx(-0.25)
    assert float(rows["RF"][5]) == pytest.approx(40.0)


def test_a_missing_snapshot_is_an_error_naming_it(
    tiled: LocalTiled, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tiled, capsys, "show", "0b1d0000-0000-4000-8000-000000000000")
    assert code == 2
    assert "0b1d0000-0000-4000-8000-000000000000" in out
