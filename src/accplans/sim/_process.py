"""Starting twins in child processes on loopback, for tests and the demo.

``with run_twin("small", seed=1) as twin:`` starts ``python -m accplans.sim serve ...`` in its
own process group, on free CA and PVA ports of 127.0.0.1, waits until its ``MACHINE:ID``
answers, and stops and reaps it on exit (also on exceptions; the child also gets SIGTERM if
this process dies, through ``prctl(PR_SET_PDEATHSIG)``).

EPICS client contexts (libca for CA, the p4p/pvxs context ophyd-async uses for PVA) read the
environment once per process, when they are first created. A process that talks to several
twins must therefore list all their ports before its first connection::

    ports = reserve_ports(2)                       # before any CA/PVA client exists
    os.environ.update(client_environment(ports))
    with run_twin("small", ports=ports[0]) as a, run_twin("ebs", ports=ports[1]) as b:
        ...

:class:`TwinControl` talks to the twin's control PVs through its own PVA context, configured
explicitly for that twin, so it works whatever the process environment says.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import ErrorModel
from ._truth import Truth, load_truth

__all__ = [
    "TwinControl",
    "TwinPorts",
    "TwinProcess",
    "client_environment",
    "loopback_environment",
    "reserve_ports",
    "run_twin",
]

_HOST = "127.0.0.1"
#: Ports are picked below Linux's ephemeral range (32768-60999), so that client sockets do
#: not take them between reservation and use.
_PORT_RANGE = (20000, 32000)


def loopback_environment() -> dict[str, str]:
    """The EPICS variables that keep servers and clients on loopback (ECOSYSTEM.md)."""
    return {
        "EPICS_CA_ADDR_LIST": _HOST,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_INTF_ADDR_LIST": _HOST,
        "EPICS_CAS_BEACON_ADDR_LIST": _HOST,
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": _HOST,
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVAS_INTF_ADDR_LIST": _HOST,
        "EPICS_PVAS_BEACON_ADDR_LIST": _HOST,
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }


@dataclass(frozen=True)
class TwinPorts:
    """The loopback ports of one twin.

    Attributes:
        ca: CA server port (TCP, and UDP for name searches).
        pva: PVA server TCP port.
        pva_broadcast: PVA server UDP port (name searches).
    """

    ca: int
    pva: int
    pva_broadcast: int

    def server_environment(self) -> dict[str, str]:
        """EPICS variables of the twin process: loopback, these ports."""
        env = loopback_environment()
        env.update(
            {
                "EPICS_CA_SERVER_PORT": str(self.ca),
                "EPICS_CAS_SERVER_PORT": str(self.ca),
                "EPICS_PVAS_SERVER_PORT": str(self.pva),
                "EPICS_PVAS_BROADCAST_PORT": str(self.pva_broadcast),
                "EPICS_CA_ADDR_LIST": f"{_HOST}:{self.ca}",
                "EPICS_PVA_ADDR_LIST": f"{_HOST}:{self.pva_broadcast}",
            }
        )
        return env

    def pva_client_conf(self) -> dict[str, str]:
        """Configuration of a p4p client context that finds this twin only."""
        return {
            "EPICS_PVA_ADDR_LIST": f"{_HOST}:{self.pva_broadcast}",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_BROADCAST_PORT": str(self.pva_broadcast),
        }


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((_HOST, port))
            except OSError:
                return False
    return True


def reserve_ports(n: int = 1) -> list[TwinPorts]:
    """Pick ports for ``n`` twins: distinct, currently free for TCP and UDP on 127.0.0.1.

    Nothing holds them afterwards; they are drawn at random from 20000-32000 (outside the
    ephemeral range), so parallel sessions rarely collide, and a twin that cannot bind fails
    to start with a clear error.
    """
    if n < 0:
        raise ValueError(f"reserve_ports: n must be >= 0, got {n}")
    rng = random.Random()
    chosen: set[int] = set()
    out: list[TwinPorts] = []
    for _ in range(n):
        trio = []
        for _attempt in range(1000):
            p = rng.randrange(*_PORT_RANGE)
            if p not in chosen and _free(p):
                chosen.add(p)
                trio.append(p)
                if len(trio) == 3:
                    break
        if len(trio) != 3:
            raise RuntimeError("reserve_ports: no free loopback ports in 20000-32000")
        out.append(TwinPorts(*trio))
    return out


def client_environment(ports: Iterable[TwinPorts]) -> dict[str, str]:
    """EPICS client variables that reach every twin in ``ports`` (and nothing else).

    Apply them (``os.environ.update``) before the process creates its first CA or PVA client
    context: contexts read the environment once.
    """
    plist = list(ports)
    env = loopback_environment()
    env["EPICS_CA_ADDR_LIST"] = " ".join(f"{_HOST}:{p.ca}" for p in plist) or _HOST
    env["EPICS_PVA_ADDR_LIST"] = " ".join(f"{_HOST}:{p.pva_broadcast}" for p in plist) or _HOST
    return env


class TwinControl:
    """The twin's control PVs (``TWIN:<prefix>...``) through a private PVA client context.

    Every method blocks until the twin has acted (a put with completion) and raises
    ``TimeoutError``/``RuntimeError`` naming the PV when it cannot.

    Args:
        twin_prefix: the control prefix, e.g. ``"TWIN:SMALL:"``.
        ports: the twin's ports.
        timeout: default timeout of each operation (s).
    """

    def __init__(self, twin_prefix: str, ports: TwinPorts, timeout: float = 30.0) -> None:
        from p4p.client.thread import Context

        self.twin_prefix = twin_prefix
        self.ports = ports
        self.timeout = timeout
        self._ctx: Any = Context("pva", conf=ports.pva_client_conf(), useenv=False)

    def close(self) -> None:
        """Close the client context."""
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def get(self, pv: str, timeout: float | None = None) -> Any:
        """Value of any PV of this twin (full name)."""
        try:
            return self._ctx.get(pv, timeout=timeout or self.timeout)
        except TimeoutError:
            raise TimeoutError(f"twin: no answer from {pv} on PVA port {self.ports.pva}") from None

    def put(self, pv: str, value: Any, timeout: float | None = None) -> None:
        """Put with completion to any PV of this twin (full name)."""
        try:
            self._ctx.put(pv, value, wait=True, timeout=timeout or self.timeout)
        except TimeoutError:
            raise TimeoutError(f"twin: put to {pv} did not complete") from None

    def _ctl(self, suffix: str) -> str:
        return self.twin_prefix + suffix

    # -- controls ----------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Reset the twin: new errors from ``seed``, design setpoints, beam refilled.

        Drift stops; the ramp rate and the noise go back to their startup values.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.put(self._ctl("RESET"), int(seed))

    @property
    def seed(self) -> int:
        """The current error seed."""
        return int(self.get(self._ctl("SEED")))

    def kill_beam(self) -> None:
        """Dump the beam (current 0, BPMs invalid) until :meth:`refill`."""
        self.put(self._ctl("KILL_BEAM"), 1)

    def refill(self) -> None:
        """Inject again (lost at once if there is no closed orbit)."""
        self.put(self._ctl("REFILL"), 1)

    @property
    def beam(self) -> bool:
        """Whether there is beam."""
        return bool(int(self.get(self._ctl("BEAM"))))

    @property
    def loss_reason(self) -> str:
        """Why the beam was lost ("" with beam)."""
        return _text(self.get(self._ctl("LOSS_REASON")))

    def inject_drift(self, rate_m_per_s: float) -> None:
        """Quadrupoles drift at this rms speed per plane (m/s); 0 stops them."""
        self.put(self._ctl("DRIFT"), float(rate_m_per_s) * 1e6)

    def set_circumference_error(self, dl_m: float) -> None:
        """Make the true ring ``dl_m`` (m) longer than its lattice; ``reset`` sets it to 0.

        The design RF frequency then no longer centres the beam energy; the truth exports the
        frequency that does (``centred_rf_frequency_hz``) and the beam's ``energy_offset``.
        """
        self.put(self._ctl("CIRCUMFERENCE_ERROR"), float(dl_m) * 1e6)

    def set_ramp_rate(self, rate_a_per_s: float) -> None:
        """Magnet ramp rate (A/s); 0: readbacks follow setpoints at once."""
        self.put(self._ctl("RAMP_RATE"), float(rate_a_per_s))

    def set_noise(self, on: bool) -> None:
        """Turn BPM and tune noise on or off."""
        self.put(self._ctl("NOISE"), int(bool(on)))

    def set_bad_bpm(self, name: str, kind: str, value: float = 0.0) -> None:
        """Make BPM ``name`` bad, or good again (``reset`` makes every BPM good).

        ``kind``: ``"dead"``, ``"noisy"`` (value: rms, m), ``"gain"`` (value: factor),
        ``"swapped"`` (x and y exchanged) or ``"good"``. Applies to its turn-by-turn buffers
        and closed-orbit readings; exported in the truth (``meta["bad_bpms"]``).
        """
        if not name or any(c.isspace() for c in name + kind):
            raise ValueError(f"set_bad_bpm: bad BPM name or kind {name!r}, {kind!r}")
        self.put(self._ctl("BAD_BPM"), f"{name} {kind} {float(value)!r}")
        error = _text(self.get(self._ctl("BAD_BPM:ERROR")))
        if error:
            raise ValueError(f"twin: set_bad_bpm({name!r}, {kind!r}, {value!r}): {error}")

    def export_truth(self, directory: str | Path | None = None) -> Truth:
        """Make the twin write its truth to ``directory`` (its own default if None); load it."""
        target = "" if directory is None else str(Path(directory).resolve())
        if len(target) >= 1023:
            raise ValueError(f"export path too long for the EXPORT PV: {target!r}")
        self.put(self._ctl("EXPORT"), target)
        path = _text(self.get(self._ctl("EXPORT:PATH")))
        if not path:
            error = _text(self.get(self._ctl("EXPORT:ERROR")))
            raise RuntimeError(f"twin: truth export failed: {error}")
        return load_truth(path)


def _text(value: Any) -> str:
    """A long-string PV value (char array or str) as text."""
    if isinstance(value, str):
        return str.__str__(value).split("\0", 1)[0]
    arr = np.asarray(value).astype(np.uint8).tobytes()
    return arr.split(b"\0", 1)[0].decode(errors="replace")


@dataclass
class TwinProcess:
    """A running twin (what :func:`run_twin` yields).

    Attributes:
        machine: machine name.
        machine_id: identity served at ``<prefix>MACHINE:ID``.
        prefix: PV prefix of the machine.
        twin_prefix: prefix of the control and truth PVs.
        ports: its loopback ports.
        pid: process id (also its process group id).
        environment: EPICS client variables that reach this twin only.
        control: the control helper.
        ready: what the twin reported when ready (start time ``start_s``, ``records``, ...).
    """

    machine: str
    machine_id: str
    prefix: str
    twin_prefix: str
    ports: TwinPorts
    pid: int
    environment: dict[str, str]
    control: TwinControl
    ready: dict[str, Any]
    process: subprocess.Popen[bytes] = field(repr=False)
    _log: Any = field(repr=False, default=None)

    def pv(self, suffix: str) -> str:
        """Full PV name of ``suffix`` under the machine prefix."""
        return self.prefix + suffix

    def log(self) -> str:
        """What the twin wrote to stdout and stderr so far."""
        return _read_log(self._log)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the twin (SIGTERM, then SIGKILL) and reap it; return its exit code."""
        self.control.close()
        return _stop(self.process, timeout)


def _read_log(handle: Any, limit: int = 20000) -> str:
    if handle is None:
        return ""
    try:
        size = os.fstat(handle.fileno()).st_size
        data = os.pread(handle.fileno(), min(size, limit), max(0, size - limit))
    except (OSError, ValueError):
        return ""
    return data.decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    # anything the twin may have left in its process group goes too
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def _wait_ready(proc: subprocess.Popen[bytes], fd: int, timeout: float, log: Any) -> dict:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"twin (pid {proc.pid}) not ready after {timeout:g} s; its log:\n{_read_log(log)}"
            )
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # the twin closed the pipe: it died before being ready
            code = proc.wait(5)
            raise RuntimeError(
                f"twin exited with code {code} before being ready; its log:\n{_read_log(log)}"
            )
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("READY "):
        raise RuntimeError(f"twin: unexpected ready message {line!r}")
    return json.loads(line[len("READY ") :])


def _machine_args(machine: str | Path | None, lattice: str | Path | None) -> list[str]:
    if lattice is not None:
        return ["--lattice", str(Path(lattice).resolve())]
    text = str(machine if machine is not None else "small")
    if text in ("small", "ebs"):
        return ["--machine", text]
    return ["--machine", str(Path(text).resolve())]


@contextmanager
def run_twin(
    machine: str | Path | None = "small",
    *,
    seed: int = 1,
    errors: bool | ErrorModel = True,
    noise: bool = True,
    ports: TwinPorts | None = None,
    lattice: str | Path | None = None,
    ramp_rate: float | None = None,
    tick: str = "event",
    export_dir: str | Path | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 120.0,
) -> Iterator[TwinProcess]:
    """Run a twin in a child process on loopback for the duration of the ``with`` block.

    Args:
        machine: built-in machine (``"small"``, ``"ebs"``) or a description YAML file.
        seed: error seed.
        errors: ``True`` (default error model), ``False`` (perfect machine, noise kept) or an
            :class:`ErrorModel`.
        noise: noisy BPM and tune readings.
        ports: its ports (default: freshly reserved).
        lattice: serve this lattice file instead of ``machine`` (any file pyAT reads).
        ramp_rate: magnet ramp rate (A/s; the server's default if None, 0: at once).
        tick: ``"event"`` or ``"periodic"``.
        export_dir: where ``EXPORT`` with an empty path writes.
        extra_args: more ``serve`` arguments.
        start_timeout: seconds to wait for it to be ready.

    Yields:
        The running :class:`TwinProcess`; it is stopped and reaped when the block exits.
    """
    ports = ports if ports is not None else reserve_ports(1)[0]
    args = [sys.executable, "-m", "accplans.sim", "serve", *_machine_args(machine, lattice)]
    args += ["--seed", str(int(seed)), "--tick", tick]
    args += ["--ca-port", str(ports.ca), "--pva-port", str(ports.pva)]
    args += ["--pva-broadcast-port", str(ports.pva_broadcast), "--parent-pid", str(os.getpid())]
    if ramp_rate is not None:
        args += ["--ramp-rate", str(float(ramp_rate))]
    if not noise:
        args.append("--no-noise")
    if export_dir is not None:
        args += ["--export-dir", str(export_dir)]
    errors_file = None
    if isinstance(errors, ErrorModel):
        errors_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(errors.to_dict(), errors_file)
        errors_file.close()
        args += ["--errors", errors_file.name]
    elif not errors:
        args.append("--no-errors")
    args += list(extra_args)
    env = dict(os.environ)
    env.update(ports.server_environment())
    # the twin's linear algebra is 5x5: BLAS threads only cost memory (~80 MB) and CPU
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    read_fd, write_fd = os.pipe()
    args += ["--ready-fd", str(write_fd)]
    log = tempfile.TemporaryFile()  # unlinked at once; closed below
    proc: subprocess.Popen[bytes] | None = None
    control: TwinControl | None = None
    try:
        proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        write_fd = -1
        ready = _wait_ready(proc, read_fd, start_timeout, log)
        control = TwinControl(ready["twin_prefix"], ports)
        ident = _text(control.get(ready["prefix"] + "MACHINE:ID", timeout=start_timeout))
        if ident != ready["machine_id"]:
            raise RuntimeError(
                f"twin on PVA port {ports.pva} serves MACHINE:ID {ident!r}, "
                f"expected {ready['machine_id']!r}: another IOC answers on these ports"
            )
        with socket.create_connection((_HOST, ports.ca), timeout=5.0):
            pass  # the CA server accepts connections
        yield TwinProcess(
            machine=ready["machine"],
            machine_id=ready["machine_id"],
            prefix=ready["prefix"],
            twin_prefix=ready["twin_prefix"],
            ports=ports,
            pid=proc.pid,
            environment=client_environment([ports]),
            control=control,
            ready=ready,
            process=proc,
            _log=log,
        )
    finally:
        if control is not None:
            control.close()
        if proc is not None:
            _stop(proc, 10.0)
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        log.close()
        if errors_file is not None:
            with suppress(OSError):
                os.unlink(errors_file.name)
