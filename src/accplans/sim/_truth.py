"""The twin's truth: its true lattice and injected errors, in memory and on disk.

On disk a truth is a directory with three files:

- ``lattice.mat``: the true pyAT lattice at export time (misalignments as ``T1``/``T2``/``R1``/
  ``R2``, true strengths including gradient and calibration errors, apertures), readable by
  ``at.load_lattice`` (and Matlab AT);
- ``truth.npz``: the error arrays (SI units; see :class:`~accplans.sim.TwinErrors`), plus
  ``magnet_names``, ``magnet_hardware`` (A, the readbacks applied) and ``magnet_scale`` (true
  strength / nominal strength of each magnet's first element);
- ``truth.json``: metadata (machine, seed, error model, RF frequency, ``dct_m``, beam state).

What the twin's BPMs read is ``Truth.readings(orbit)`` plus noise, with ``orbit`` the closed
orbit of the true lattice at ``dct_m`` (``at.find_orbit4(truth.ring, dct=truth.dct_m)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import at
import numpy as np

from ._errors import bpm_readings

__all__ = ["Truth", "load_truth"]

_LATTICE = "lattice.mat"
_ARRAYS = "truth.npz"
_META = "truth.json"


@dataclass
class Truth:
    """The true machine behind a twin.

    Attributes:
        ring: the true pyAT lattice.
        meta: metadata (``machine``, ``seed``, ``error_model``, ``rf_frequency_hz``, ``dct_m``,
            ``beam``, ...).
        arrays: the error arrays by name (see the module docstring).
    """

    ring: at.Lattice
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    # -- convenience -------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The error seed."""
        return int(self.meta["seed"])

    @property
    def dct_m(self) -> float:
        """Path lengthening of the closed orbit at the served RF frequency (m)."""
        return float(self.meta["dct_m"])

    @property
    def rf_frequency_hz(self) -> float:
        """The served RF frequency (Hz)."""
        return float(self.meta["rf_frequency_hz"])

    @property
    def bpm_elements(self) -> np.ndarray:
        """Lattice index of each BPM (description order)."""
        return np.asarray(self.arrays["bpm_elements"], dtype=np.int64)

    @property
    def bpm_names(self) -> list[str]:
        """BPM device names."""
        return [str(n) for n in self.arrays["bpm_names"]]

    def __getitem__(self, name: str) -> np.ndarray:
        """An error array by name (``truth["bpm_offset_m"]``)."""
        try:
            return self.arrays[name]
        except KeyError:
            raise KeyError(
                f"the truth has no array {name!r}; arrays: {sorted(self.arrays)}"
            ) from None

    def corrector_scale(self, name: str) -> float:
        """True kick / nominal kick of corrector ``name`` (``1 + calibration error``)."""
        names = [str(n) for n in self.arrays["corrector_names"]]
        try:
            i = names.index(name)
        except ValueError:
            raise KeyError(f"the truth has no corrector {name!r}") from None
        return 1.0 + float(self.arrays["corrector_gain_rel"][i])

    def readings(self, beam_m: np.ndarray) -> np.ndarray:
        """Noiseless BPM readings (m, (n, 2)) for beam positions ``beam_m`` (m, (n, 2))."""
        return bpm_readings(
            beam_m,
            self.arrays["bpm_offset_m"],
            self.arrays["bpm_gain"],
            self.arrays["bpm_roll_rad"],
        )

    def closed_orbit(self) -> np.ndarray:
        """True beam position (m, (n, 2)) at the BPMs: pyAT's ``find_orbit4`` at ``dct_m``."""
        _, orbit = at.find_orbit4(self.ring, dct=self.dct_m, refpts=self.bpm_elements)
        return orbit[:, (0, 2)]

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the three files into ``directory`` (created if needed); return it."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        at.save_lattice(self.ring, str(path / _LATTICE))
        np.savez(path / _ARRAYS, allow_pickle=False, **self.arrays)
        (path / _META).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return path


def load_truth(directory: str | Path) -> Truth:
    """Read a truth written by the twin (``EXPORT`` PV, ``Twin.export_truth``, ``Truth.save``)."""
    path = Path(directory)
    missing = [f for f in (_LATTICE, _ARRAYS, _META) if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a twin truth: missing {missing}")
    ring = at.load_lattice(str(path / _LATTICE))
    with np.load(path / _ARRAYS) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads((path / _META).read_text())
    return Truth(ring=ring, meta=meta, arrays=arrays)
