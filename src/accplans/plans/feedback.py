"""``orbit_feedback``: the slow orbit feedback's loop as a plan, for studies.

The same controller as the service (:class:`~accplans.physics.OrbitFeedbackController`), run
from the RunEngine for a set number of iterations, each one recorded: the loop's response to
gains, regularisation and reference can be studied and replayed from Tiled. In operation, the
service (``accplans feedback serve``) runs the loop; this plan claims the correctors from it
(the service pauses) while it runs.
"""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.data import Result, run_metadata
from accplans.devices import OrbitSource, SettableFamily, call_async
from accplans.model import plane_response_blocks
from accplans.physics import FeedbackGains, OrbitFeedbackController

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, set_and_settle
from ._worker import compute
from .orbit_correction import reference_orbit

__all__ = ["orbit_feedback"]


def orbit_feedback(
    bpms: OrbitSource,
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    *,
    iterations: int = 10,
    gain: float = 0.5,
    proportional_gain: float = 0.0,
    alpha: float = 0.02,
    reference: str | Result | np.ndarray = "current",
    n_samples: int = 5,
    timeout: float = 10.0,
    md: dict[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Run the slow orbit feedback loop for ``iterations`` steps, recording each one.

    The response is the online model's (diagonal blocks at design setpoints and the fixed RF
    frequency, as the service uses). Each iteration waits for a BPM frame taken after the
    previous write settled, computes the PI step per plane, checks the corrector limits
    before writing, writes both planes and records the orbit and the kicks.

    Changes: the horizontal and vertical corrector strengths. Restores: the starting
    setpoints if the plan fails or is aborted (a correction: the result stays on success
    and the last completed step on a stop). Claims both families from the feedback service
    (it pauses while this runs).

    Args:
        bpms: the BPMs.
        hcorr: horizontal correctors (rad).
        vcorr: vertical correctors (rad).
        iterations: loop iterations (>= 1).
        gain: integral gain ki, the fraction of the error removed per iteration, (0, 1].
        proportional_gain: proportional gain kp of the velocity-form PI, [0, 1].
        alpha: Tikhonov parameter as a fraction of each plane's largest singular value.
        reference: ``"current"`` (hold the orbit as found, averaged over ``n_samples``
            frames), ``"zero"`` (steer to zero BPM readings), an array (m, x of every BPM
            then y, or (2, nbpm)), or a ``bba`` result (``load_result(client, uid, "bba")``:
            steer each BPM to its accepted centre, the reading with the beam through its
            quadrupole's centre moved there by the BPM's own scan knob: ``correct_orbit``'s
            ``reference_point="bpm"``; to hold the beam through the quadrupoles' centres,
            ``correct_orbit(reference=result)`` first and hold ``"current"``). In an array or
            a result, BPMs without a reference (NaN, no accepted centre) hold their current
            reading.
        n_samples: frames averaged for the current orbit (a ``"current"`` reference, or the
            BPMs an array or a result leaves out).
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The run's uid: a ``baseline`` event (the reference, m) and one ``primary`` event per
        iteration (orbit x, y in m, rms error per plane in m, kick changes in rad).

    Raises:
        ValueError: bad settings, or a step that would break a corrector limit (the plan
            then restores the starting setpoints).
    """
    description = description_of(bpms, hcorr, vcorr)
    if iterations < 1 or n_samples < 1:
        raise ValueError("orbit_feedback: iterations and n_samples must be >= 1")
    given = None
    if isinstance(reference, str):
        if reference not in ("current", "zero"):
            raise ValueError(
                f"orbit_feedback: reference must be 'current', 'zero', an array or a bba "
                f"result, not {reference!r}"
            )
    else:
        given = reference_orbit(reference, [str(n) for n in bpms.names])
        given = given.reshape(2, len(bpms.names))
    gains = FeedbackGains(ki=float(gain), kp=float(proportional_gain))
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"orbit_feedback: alpha must be a finite fraction >= 0, got {alpha!r}")
    moved = [hcorr, vcorr]
    nbpm = len(bpms.names)
    _md = run_metadata(
        description,
        plan_name="orbit_feedback",
        plan_args={
            "bpms": bpms.name,
            "hcorr": hcorr.name,
            "vcorr": vcorr.name,
            "iterations": iterations,
            "gain": gain,
            "proportional_gain": proportional_gain,
            "alpha": alpha,
            "reference": reference
            if isinstance(reference, str)
            else (reference.uid if isinstance(reference, Result) else "array"),
            "n_samples": n_samples,
        },
        units={
            "reference-x": "m",
            "reference-y": "m",
            "step-orbit_x": "m",
            "step-orbit_y": "m",
            "step-error_rms_x": "m",
            "step-error_rms_y": "m",
            "step-dtheta_h": "rad",
            "step-dtheta_v": "rad",
        },
        num_points=iterations,
        bpm_names=list(bpms.names),
        corrector_names=[*hcorr.names, *vcorr.names],
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        rx, ry = yield from compute(
            plane_response_blocks,
            description,
            list(bpms.names),
            list(hcorr.names),
            list(vcorr.names),
        )
        controller = OrbitFeedbackController(rx, ry, gains_x=gains, gains_y=gains, alpha=alpha)
        after = 0.0
        for fam in moved:
            _, stamp = yield from call_async(fam.stamped_readbacks)
            after = max(after, stamp)
        ref_record = Record(
            "reference", {"x": np.zeros(nbpm), "y": np.zeros(nbpm)}, source=bpms.name
        )
        step_record = Record(
            "step",
            {
                "iteration": 0,
                "orbit_x": np.zeros(nbpm),
                "orbit_y": np.zeros(nbpm),
                "error_rms_x": 0.0,
                "error_rms_y": 0.0,
                "dtheta_h": np.zeros(len(hcorr.names)),
                "dtheta_v": np.zeros(len(vcorr.names)),
            },
            {
                "orbit_x": "m",
                "orbit_y": "m",
                "error_rms_x": "m",
                "error_rms_y": "m",
                "dtheta_h": "rad",
                "dtheta_v": "rad",
            },
            source=bpms.name,
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            nonlocal after
            hold = given is None and reference == "current"
            if hold or (given is not None and bool(np.any(np.isnan(given)))):
                frames = []
                for _ in range(n_samples):
                    frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
                    frames.append(np.where(frame.valid, 1.0, np.nan) * np.stack([frame.x, frame.y]))
                    after = frame.time + 2e-6
                ref = np.nanmean(np.stack(frames), axis=0)
            else:
                ref = np.zeros((2, nbpm))
            if given is not None:
                ref = np.where(np.isfinite(given), given, ref)
            yield from bps.create("baseline")
            yield from bps.read(ref_record.update(x=ref[0], y=ref[1]))
            yield from bps.save()
            for k in range(iterations):
                yield from bps.checkpoint()
                frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
                x = np.where(frame.valid, frame.x, np.nan)
                y = np.where(frame.valid, frame.y, np.nan)
                step = controller.step((x, y), (ref[0], ref[1]))
                targets = []
                for fam, delta in ((hcorr, step.dtheta_x_rad), (vcorr, step.dtheta_y_rad)):
                    current = np.asarray((yield from call_async(fam.strengths)), float)
                    target = current + delta
                    fam.check_strengths(target)  # both planes checked before either is written
                    targets.append(target)
                for fam, target in zip(moved, targets, strict=True):
                    _, stamp = yield from set_and_settle(fam, target, hardware=False)
                    after = max(after, stamp)
                yield from bps.create("primary")
                yield from bps.read(
                    step_record.update(
                        iteration=k + 1,
                        orbit_x=frame.x,
                        orbit_y=frame.y,
                        error_rms_x=step.error_rms_m[0],
                        error_rms_y=step.error_rms_m[1],
                        dtheta_h=step.dtheta_x_rad,
                        dtheta_v=step.dtheta_y_rad,
                    )
                )
                yield from bps.save()

        return (
            yield from restore_on_exit(
                run(), moved, snapshot, policy="correction", owner="orbit_feedback"
            )
        )

    return (yield from plan())
