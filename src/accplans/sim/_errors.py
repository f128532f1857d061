"""The twin's error model: what differs between the real machine and its description.

An :class:`ErrorModel` holds amplitudes (SI units); :func:`draw_errors` turns it and a seed into
:class:`TwinErrors`, the concrete errors of one machine. Every random error is drawn from a
Gaussian of the given rms (``sigma``) truncated at ``cut_sigma * sigma``.

The BPM reading (shared by the twin, its truth export and every consumer of them)::

    reading = G @ R(roll) @ (x_beam - offset) + noise       (m inside, mm on the PVs)

with ``x_beam = (x, y)`` the beam position at the BPM, ``G = diag(gain_x, gain_y)`` and
``R(roll) = [[cos, sin], [-sin, cos]]``: a BPM rolled by ``roll`` reads the beam in its own
rotated frame, as pyAT's ``at.tilt_elem`` rotates an element's frame.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ErrorModel", "TwinErrors", "bpm_readings", "draw_errors", "truncated_normal"]


@dataclass(frozen=True)
class ErrorModel:
    """Amplitudes of the twin's errors (rms of Gaussians cut at ``cut_sigma``; SI units).

    Attributes:
        quad_shift_m: transverse misalignment of quadrupoles, per plane (m).
        quad_roll_rad: roll of quadrupoles about the beam axis (rad).
        quad_gradient_rel: relative gradient (strength) error of each quadrupole element.
        sext_shift_m: transverse misalignment of sextupoles, per plane (m).
        sext_shift_x_fraction: the horizontal sextupole misalignment as a fraction of
            ``sext_shift_m`` (0: vertical offsets only, which feed down to skew gradients and
            vertical dispersion but not to tunes and beta-beating).
        sext_roll_rad: roll of sextupoles (rad).
        bpm_offset_m: BPM electrical offset, per plane (m).
        bpm_gain_rel: relative BPM gain error, per plane.
        bpm_roll_rad: BPM roll (rad).
        bpm_noise_m: rms noise of each BPM reading (m), drawn afresh for every frame.
        corrector_gain_rel: relative calibration (kick per ampere) error of each corrector.
        tune_noise: rms noise of each tune-monitor reading (fraction of a tune).
        cut_sigma: Gaussians are truncated at this many sigma.
    """

    quad_shift_m: float = 10e-6
    quad_roll_rad: float = 100e-6
    quad_gradient_rel: float = 1e-3
    sext_shift_m: float = 10e-6
    sext_roll_rad: float = 100e-6
    bpm_offset_m: float = 50e-6
    bpm_gain_rel: float = 0.01
    bpm_roll_rad: float = 1e-3
    bpm_noise_m: float = 1e-6
    corrector_gain_rel: float = 0.01
    tune_noise: float = 1e-5
    cut_sigma: float = 2.0
    sext_shift_x_fraction: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"ErrorModel.{f.name}: must be finite and >= 0, got {value!r}")
        if self.cut_sigma <= 0:
            raise ValueError(f"ErrorModel.cut_sigma: must be > 0, got {self.cut_sigma!r}")

    @classmethod
    def none(cls) -> ErrorModel:
        """A perfect machine: no errors and no noise."""
        shapes = ("cut_sigma", "sext_shift_x_fraction")  # not amplitudes
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name not in shapes})

    def without_noise(self) -> ErrorModel:
        """The same static errors, with noiseless BPM and tune readings."""
        return dataclasses.replace(self, bpm_noise_m=0.0, tune_noise=0.0)

    def to_dict(self) -> dict[str, float]:
        """The amplitudes by field name (JSON-friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "error model") -> ErrorModel:
        """Build from a mapping; unknown keys and bad values raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            values = {k: float(v) for k, v in data.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: every amplitude must be a number: {exc}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> ErrorModel:
        """Read an error model written by :meth:`to_dict` as JSON."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the error model {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an error model is a JSON object")
        return cls.from_dict(data, where=path)


def truncated_normal(
    rng: np.random.Generator, sigma: float, size: int | tuple[int, ...], cut: float
) -> np.ndarray:
    """Gaussian samples of rms ``sigma`` (before the cut), redrawn until ``|x| <= cut*sigma``."""
    z = rng.standard_normal(size)
    bad = np.abs(z) > cut
    while np.any(bad):
        z[bad] = rng.standard_normal(int(np.count_nonzero(bad)))
        bad = np.abs(z) > cut
    return sigma * z


@dataclass
class TwinErrors:
    """The concrete errors of one twin (one seed of an :class:`ErrorModel`).

    Element arrays are indexed like the ``*_elements`` lattice indices; device arrays like the
    ``*_names`` device names (description order).

    Attributes:
        seed: the seed they were drawn with.
        model: the amplitudes they were drawn from.
        quad_elements: lattice indices of the quadrupole elements.
        quad_shift_m: (n, 2) misalignment (dx, dy) of each quadrupole (m); the twin's drift
            moves it (``Twin.inject_drift``).
        quad_roll_rad: (n,) roll of each quadrupole (rad).
        quad_gradient_rel: (n,) relative strength error of each quadrupole.
        sext_elements: lattice indices of the sextupole elements.
        sext_shift_m: (n, 2) misalignment of each sextupole (m).
        sext_roll_rad: (n,) roll of each sextupole (rad).
        bpm_names: BPM device names.
        bpm_elements: lattice index of each BPM.
        bpm_offset_m: (n, 2) offsets (m).
        bpm_gain: (n, 2) gains (1 + relative error).
        bpm_roll_rad: (n,) rolls (rad).
        corrector_names: corrector device names.
        corrector_gain_rel: (n,) relative calibration error of each corrector: the kick the beam
            sees is ``(1 + corrector_gain_rel) * calibration(current)``.
    """

    seed: int
    model: ErrorModel
    quad_elements: np.ndarray
    quad_shift_m: np.ndarray
    quad_roll_rad: np.ndarray
    quad_gradient_rel: np.ndarray
    sext_elements: np.ndarray
    sext_shift_m: np.ndarray
    sext_roll_rad: np.ndarray
    bpm_names: list[str]
    bpm_elements: np.ndarray
    bpm_offset_m: np.ndarray
    bpm_gain: np.ndarray
    bpm_roll_rad: np.ndarray
    corrector_names: list[str]
    corrector_gain_rel: np.ndarray


def draw_errors(
    model: ErrorModel,
    seed: int,
    *,
    quad_elements: np.ndarray,
    sext_elements: np.ndarray,
    bpm_names: list[str],
    bpm_elements: np.ndarray,
    corrector_names: list[str],
) -> TwinErrors:
    """Draw one machine's errors from ``model`` with ``seed`` (same seed, same errors).

    Args:
        model: amplitudes.
        seed: non-negative integer seed.
        quad_elements: lattice indices of the quadrupoles to misalign.
        sext_elements: lattice indices of the sextupoles to misalign.
        bpm_names: BPM device names (description order).
        bpm_elements: lattice index of each BPM.
        corrector_names: corrector device names (description order).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x7A11])
    cut = model.cut_sigma
    nq, ns, nb, nc = len(quad_elements), len(sext_elements), len(bpm_names), len(corrector_names)
    # fixed drawing order: adding a kind of error later must not change the existing ones
    quad_shift = truncated_normal(rng, model.quad_shift_m, (nq, 2), cut)
    quad_roll = truncated_normal(rng, model.quad_roll_rad, nq, cut)
    quad_grad = truncated_normal(rng, model.quad_gradient_rel, nq, cut)
    sext_shift = truncated_normal(rng, model.sext_shift_m, (ns, 2), cut)
    sext_shift[:, 0] *= model.sext_shift_x_fraction  # after the draw: the others stay the same
    sext_roll = truncated_normal(rng, model.sext_roll_rad, ns, cut)
    bpm_offset = truncated_normal(rng, model.bpm_offset_m, (nb, 2), cut)
    bpm_gain = 1.0 + truncated_normal(rng, model.bpm_gain_rel, (nb, 2), cut)
    bpm_roll = truncated_normal(rng, model.bpm_roll_rad, nb, cut)
    cor_gain = truncated_normal(rng, model.corrector_gain_rel, nc, cut)
    return TwinErrors(
        seed=seed,
        model=model,
        quad_elements=np.asarray(quad_elements, dtype=np.int64),
        quad_shift_m=quad_shift,
        quad_roll_rad=quad_roll,
        quad_gradient_rel=quad_grad,
        sext_elements=np.asarray(sext_elements, dtype=np.int64),
        sext_shift_m=sext_shift,
        sext_roll_rad=sext_roll,
        bpm_names=list(bpm_names),
        bpm_elements=np.asarray(bpm_elements, dtype=np.int64),
        bpm_offset_m=bpm_offset,
        bpm_gain=bpm_gain,
        bpm_roll_rad=bpm_roll,
        corrector_names=list(corrector_names),
        corrector_gain_rel=cor_gain,
    )


def bpm_readings(
    beam_m: np.ndarray,
    offset_m: np.ndarray,
    gain: np.ndarray,
    roll_rad: np.ndarray,
    noise_m: np.ndarray | float = 0.0,
) -> np.ndarray:
    """What BPMs read: ``gain * R(roll) @ (beam - offset) + noise`` (module docstring).

    Args:
        beam_m: (n, 2) beam positions (x, y) at the BPMs (m).
        offset_m: (n, 2) BPM offsets (m).
        gain: (n, 2) BPM gains.
        roll_rad: (n,) BPM rolls (rad).
        noise_m: (n, 2) noise samples to add (m), or 0.

    Returns:
        (n, 2) readings (m).
    """
    d = np.asarray(beam_m, dtype=float) - offset_m
    c, s = np.cos(roll_rad), np.sin(roll_rad)
    u = c * d[:, 0] + s * d[:, 1]
    v = -s * d[:, 0] + c * d[:, 1]
    return np.stack([u, v], axis=1) * gain + noise_m
