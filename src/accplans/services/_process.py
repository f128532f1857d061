"""Run the orbit feedback service in a child process (tests, the demo, a notebook)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FeedbackProcess", "run_feedback"]

_LOOPBACK = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}


@dataclass
class FeedbackProcess:
    """A running feedback service (what :func:`run_feedback` yields).

    Attributes:
        prefix: its PV prefix.
        log_path: its write log (JSON lines: writes, claims, releases, expiries).
        pid: process id (also its process group).
    """

    prefix: str
    log_path: Path
    pid: int
    process: subprocess.Popen[bytes] = field(repr=False)
    _output: Any = field(repr=False, default=None)

    def entries(self) -> list[dict[str, Any]]:
        """The write log so far."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def output(self) -> str:
        """What the service printed so far (its log)."""
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop it (SIGTERM, then SIGKILL) and reap it."""
        return _stop(self.process, timeout)


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
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


@contextmanager
def run_feedback(
    machine: str | Path,
    *,
    address: str | None,
    ca_port: int,
    pva_port: int,
    pva_broadcast_port: int,
    log_path: str | Path,
    rate_hz: float = 2.0,
    gain: float = 0.5,
    enable: bool = False,
    claim_timeout_s: float = 10.0,
    frames: int = 1,
    extra_args: tuple[str, ...] = (),
    start_timeout: float = 120.0,
) -> Iterator[FeedbackProcess]:
    """Run ``accplans feedback serve`` in a child process for the ``with`` block.

    Args:
        machine: built-in machine name or description YAML.
        address: the twin's ``host:port`` (``None``: the EPICS environment).
        ca_port: the service's CA server port (loopback).
        pva_port: its PVA server TCP port.
        pva_broadcast_port: its PVA server UDP port.
        log_path: its write log.
        rate_hz: iterations per second.
        gain: integral gain of both planes.
        enable: start correcting at once.
        claim_timeout_s: the claim watchdog's timeout (s).
        frames: BPM frames averaged per iteration.
        extra_args: more ``serve`` arguments.
        start_timeout: seconds to wait until it serves.
    """
    text = str(machine)
    machine_arg = text if text in ("small", "ebs") else str(Path(text).resolve())
    args = [sys.executable, "-m", "accplans.services", "feedback", "serve"]
    args += ["--machine", machine_arg, "--log", str(log_path)]
    args += ["--rate", str(rate_hz), "--gain", str(gain), "--claim-timeout", str(claim_timeout_s)]
    args += ["--frames", str(frames), "--ca-port", str(ca_port), "--pva-port", str(pva_port)]
    args += ["--pva-broadcast-port", str(pva_broadcast_port), "--parent-pid", str(os.getpid())]
    if address is not None:
        args += ["--address", address]
    if enable:
        args.append("--enable")
    args += list(extra_args)
    env = dict(os.environ)
    env.update(_LOOPBACK)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    read_fd, write_fd = os.pipe()
    args += ["--ready-fd", str(write_fd)]
    output = tempfile.TemporaryFile()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        write_fd = -1
        info = _wait_ready(proc, read_fd, start_timeout, output)
        yield FeedbackProcess(info["prefix"], Path(info["log"]), proc.pid, proc, output)
    finally:
        if proc is not None:
            _stop(proc, 10.0)
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        output.close()


def _wait_ready(proc: subprocess.Popen[bytes], fd: int, timeout: float, output: Any) -> dict:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"feedback (pid {proc.pid}) not ready after {timeout:g} s")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            code = proc.wait(5)
            output.seek(0)
            log = output.read().decode(errors="replace")[-5000:]
            raise RuntimeError(f"feedback exited with code {code} before being ready:\n{log}")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("READY "):
        raise RuntimeError(f"feedback: unexpected ready message {line!r}")
    return json.loads(line[len("READY ") :])
