"""``measure_orbit``: N fresh orbit samples, averaged, with their spread."""

from __future__ import annotations

from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.data import ResultReadable, run_metadata
from accplans.devices import OrbitSource, resolve_select
from accplans.physics import orbit_statistics

from ._record import Record
from ._safety import description_of
from ._stubs import read_orbit_frame

__all__ = ["measure_orbit"]


def _orbit_record(nbpm: int, source: str) -> Record:
    """The record of one orbit frame (x, y in m, valid flags, counter, time)."""
    return Record(
        "orbit",
        {
            "x": np.zeros(nbpm),
            "y": np.zeros(nbpm),
            "valid": np.zeros(nbpm, np.int8),
            "counter": 0,
            "frame_time": 0.0,
        },
        {"x": "m", "y": "m", "frame_time": "s"},
        source=source,
    )


def measure_orbit(
    bpms: OrbitSource,
    *,
    n_samples: int = 10,
    bpm_select: Any = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the closed orbit: ``n_samples`` fresh BPM frames, their mean and spread.

    Each sample is a BPM frame taken after the previous one (never the same frame twice). The
    run records every frame (``primary`` stream) and the result (``result_orbit``: mean and
    standard deviation per BPM in m, and the number of valid samples).

    Args:
        bpms: the BPM family (an orbit source).
        n_samples: number of frames to average (>= 1).
        bpm_select: BPMs to record (names, indices or a boolean mask); all by default.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Changes nothing on the machine.

    Returns:
        The uid of the run.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    names = [bpms.names[i] for i in rows]
    _md = run_metadata(
        description_of(bpms),
        plan_name="measure_orbit",
        plan_args={"bpms": bpms.name, "n_samples": n_samples, "bpm_select": repr(bpm_select)},
        units={"orbit-x": "m", "orbit-y": "m"},
        num_points=n_samples,
        bpm_names=names,
    )
    _md.update(md or {})

    @bpp.run_decorator(md=_md)
    def inner() -> MsgGenerator[None]:
        xs, ys, oks = [], [], []
        record = _orbit_record(len(rows), bpms.name)
        after = 0.0  # the first sample is the latest frame; each later one is newer
        for _ in range(n_samples):
            yield from bps.checkpoint()
            frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
            after = frame.time + 2e-6
            x, y, ok = frame.x[rows], frame.y[rows], frame.valid[rows]
            xs.append(x)
            ys.append(y)
            oks.append(ok)
            yield from bps.create("primary")
            yield from bps.read(
                record.update(
                    x=x,
                    y=y,
                    valid=ok.astype(np.int8),
                    counter=frame.counter,
                    frame_time=frame.time,
                )
            )
            yield from bps.save()
        mx, sx, _ = orbit_statistics(np.array(xs), np.array(oks))
        my, sy, _ = orbit_statistics(np.array(ys), np.array(oks))
        yield from bps.create("result_orbit")
        yield from bps.read(
            ResultReadable(
                "orbit", x=mx, y=my, std_x=sx, std_y=sy, bpm_names=names, n_samples=n_samples
            )
        )
        yield from bps.save()

    return cast(str, (yield from inner()))  # run_decorator returns the run's uid
