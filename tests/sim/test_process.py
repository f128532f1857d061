"""Twin processes: start from any lattice file, stop cleanly, die with their parent; EBS size."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import at
import numpy as np
import pytest
from aioca import caget, caput

from accplans.config import BUILTIN_LATTICES, emittance_pvs, load_description
from accplans.sim import TwinPorts, TwinProcess, run_twin


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) pids whose process group is ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (from /proc)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _wait_group_empty(pgid: int, timeout: float) -> list[str]:
    """Wait for every process of group ``pgid`` to exit; the command lines of those left."""
    deadline = time.monotonic() + timeout
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = []
    for pid in members:
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return left


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait for any process (not only a child) to exit, through a pidfd; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def test_twin_from_a_lattice_file_stops_and_leaves_nothing_behind(twin_ports: TwinPorts, tmp_path):
    path = tmp_path / "myring.mat"
    pid = -1
    at.save_lattice(BUILTIN_LATTICES["small"](), str(path))
    with (
        pytest.raises(RuntimeError, match="boom"),
        run_twin(
            lattice=path,
            ports=twin_ports,
            errors=False,
            tick="periodic",
            export_dir=tmp_path / "exports",
        ) as twin,
    ):
        pid = twin.pid
        assert twin.machine == "myring" and twin.prefix == "MYRING:"
        assert twin.control.get("MYRING:MACHINE:ID") == "myring-twin"
        assert len(twin.control.get("MYRING:BPMS:X")) == 16
        # periodic ticks: a completed put has been taken into account too
        t_put = time.time()
        twin.control.put("MYRING:HCM001:SP", 0.3)
        assert twin.control.get("MYRING:HCM001:RB") == 0.3
        assert twin.control.get("MYRING:BPMS:TIME") >= t_put
        truth = twin.control.export_truth()  # to the --export-dir
        assert truth.meta["machine"] == "myring"
        assert (tmp_path / "exports" / "lattice.mat").exists()
        # the emittance monitor computes in a worker process (and its resource tracker): wait
        # until it has, so the check below covers the twin's own children too
        counter = emittance_pvs("MYRING:")["counter"]
        deadline = time.monotonic() + 60
        while twin.control.get(counter) < 1:
            assert time.monotonic() < deadline, "the emittance monitor never computed"
            time.sleep(0.2)
        members = set(_group_members(pid))
        assert pid in members and len(members) > 1, members
        assert all(_descends_from(m, pid) for m in members), members
        raise RuntimeError("boom")
    assert _wait_exit(pid, 0)  # already reaped when the block exits
    assert _wait_group_empty(pid, 30) == []


def test_twin_dies_with_its_parent(twin_ports: TwinPorts):
    code = textwrap.dedent(
        f"""
        import sys, time
        from accplans.sim import TwinPorts, run_twin
        with run_twin("small", ports=TwinPorts({twin_ports.ca}, {twin_ports.pva},
                      {twin_ports.pva_broadcast})) as twin:
            print("TWINPID", twin.pid, flush=True)
            time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert parent.stdout is not None
        line = b""
        while not line.startswith(b"TWINPID"):  # pyAT may print first
            line = parent.stdout.readline()
            assert line, "the parent process ended before starting its twin"
        twin_pid = int(line.split()[1])
        assert not _wait_exit(twin_pid, 0)
        parent.kill()  # SIGKILL: no cleanup in the parent; the twin must notice on its own
        parent.wait(10)
        # SIGTERM from prctl, then a graceful stop (up to 10 s) and EPICS exit: generous on a
        # loaded 2-core CI machine, where 20 s was once not enough
        assert _wait_exit(twin_pid, 60), "the twin outlived its parent"
        # its workers (and multiprocessing's resource tracker) see it gone and exit too
        assert _wait_group_empty(twin_pid, 30) == []
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.ebs
async def test_ebs_family_put_of_every_corrector(fresh_ebs_twin: TwinProcess, tmp_path):
    twin = fresh_ebs_twin
    desc = load_description("ebs")
    twin.control.set_noise(False)
    truth = twin.control.export_truth(tmp_path / "before")
    names = desc.families["hcorr"].devices
    assert len(names) == 288
    currents = np.random.default_rng(0).uniform(-0.05, 0.05, len(names))
    counter = await caget(twin.pv("BPMS:COUNTER"))
    await caput(twin.pv("HCORR:SP"), currents, wait=True, timeout=30)
    assert await caget(twin.pv("BPMS:COUNTER")) > counter
    x = await caget(twin.pv("BPMS:X"))
    assert len(x) == 320
    ring = truth.ring.deepcopy()
    for name, current in zip(names, currents, strict=True):
        dev = desc.device(name)
        assert dev.calibration is not None
        kick = float(dev.calibration.to_strength(current)) * truth.corrector_scale(name)
        ring[dev.elements[0]].KickAngle[0] = kick
    _, orbit = at.find_orbit4(ring, dct=truth.dct_m, refpts=truth.bpm_elements)
    expected = truth.readings(orbit[:, (0, 2)])[:, 0] * 1e3
    np.testing.assert_allclose(x, expected, atol=1e-6)
