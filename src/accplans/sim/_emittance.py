"""The twin's emittance monitor: equilibrium emittances and beam sizes of the true lattice.

What it serves (PV names :func:`accplans.config.emittance_pvs`, under ``<prefix>EMIT:``):
``X``, ``Y`` (pm rad), ``SIZE_X``, ``SIZE_Y`` (um), ``TIME`` (epoch of the magnet readbacks
the values belong to), ``COUNTER`` (last, increments at every publication), ``BUSY``.

Physics (:func:`compute_emittances`, run in a worker process: pyAT holds the GIL for seconds on
EBS): a copy of the true lattice with radiation and cavities on (``enable_6d``), its cavities
at the frequency whose path lengthening is the twin's ``dct`` (so the circumference error is
seen as on the machine), ``at.ohmi_envelope`` at the source point. ``X``/``Y`` are the
mode emittances of modes 1 and 2 (the vertical one from coupling and vertical dispersion
together); ``SIZE_X``/``SIZE_Y`` are ``sqrt`` of the beam matrix's ``<xx>`` and ``<yy>`` at the
source point (element ``source_element``, the ring entrance by default), so they include the
dispersion times the energy spread. No quantum-excitation-free limit is added: a perfect
lattice has ``eps_y`` ~ 1e-7 of ``eps_x``.

Timing: after magnets (or the RF frequency) change, the IOC waits until they have been still
for ``quiet_s`` (an ORM scan does not make the worker recompute at every kick), then computes
in its worker; the values published carry the readback snapshot's time in ``TIME``, so a plan
waits for ``TIME`` at or after its magnets settled, as for BPM frames. Between computations,
every idle model tick republishes the last values with fresh noise: each value gets a relative
Gaussian noise of ``noise_rel`` rms (1 % by default) at every publication.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import at
import numpy as np
from scipy.optimize import minimize_scalar

from accplans.config import MachineDescription, emittance_pvs
from accplans.model import frequency_for_dct
from accplans.physics import closest_tune_approach, eigen_tunes, wrap_tune

from ._workers import stop_pool, worker_pool

if TYPE_CHECKING:
    from ._twin import Twin

__all__ = [
    "EmittanceRequest",
    "EmittanceResult",
    "EmittanceServer",
    "EmittanceSettings",
    "compute_emittances",
    "scan_c_minus",
    "true_c_minus",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmittanceSettings:
    """Settings of the twin's emittance monitor.

    Attributes:
        source_element: lattice index of the source point of the beam sizes.
        noise_rel: relative rms noise of every published value.
        quiet_s: the magnets must be still this long before a recomputation (s).
    """

    source_element: int = 0
    noise_rel: float = 0.01
    quiet_s: float = 0.3

    def __post_init__(self) -> None:
        if not np.isfinite(self.noise_rel) or self.noise_rel < 0:
            raise ValueError(f"EmittanceSettings.noise_rel must be >= 0: {self.noise_rel!r}")
        if not np.isfinite(self.quiet_s) or self.quiet_s < 0:
            raise ValueError(f"EmittanceSettings.quiet_s must be >= 0: {self.quiet_s!r}")


@dataclass
class EmittanceRequest:
    """The true lattice (pickled) at a snapshot of the readbacks, for the worker."""

    ring_pickle: bytes
    dct_m: float
    source_element: int
    snapshot_time: float


@dataclass
class EmittanceResult:
    """Equilibrium emittances (m rad) and beam sizes at the source point (m).

    Attributes:
        emittance_m: (2,) mode emittances (x-like, y-like).
        size_m: (2,) rms beam sizes (x, y) at the source point.
        snapshot_time: epoch of the readbacks they belong to.
        compute_s: time the computation took (s).
    """

    emittance_m: np.ndarray
    size_m: np.ndarray
    snapshot_time: float
    compute_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def emittance_request(
    twin: Twin, settings: EmittanceSettings, snapshot_time: float | None = None
) -> EmittanceRequest:
    """A request for the twin's machine as it is now (the true lattice pickled now)."""
    n = len(twin.ring)
    if not 0 <= settings.source_element < n:
        raise ValueError(f"source_element must be in [0, {n}), got {settings.source_element}")
    return EmittanceRequest(
        ring_pickle=pickle.dumps(twin.ring, protocol=pickle.HIGHEST_PROTOCOL),
        dct_m=float(twin.dct),
        source_element=int(settings.source_element),
        snapshot_time=time.time() if snapshot_time is None else snapshot_time,
    )


def compute_emittances(request: EmittanceRequest) -> EmittanceResult:
    """Equilibrium emittances and beam sizes of the true lattice (runs in a worker process)."""
    t0 = time.perf_counter()
    ring: at.Lattice = pickle.loads(request.ring_pickle)
    cavities = ring.get_uint32_index(at.RFCavity)
    frequency = float(frequency_for_dct(ring, request.dct_m))
    r6 = ring.enable_6d(copy=True)
    for i in cavities:
        r6[i].Frequency = frequency
    _, beam, env = at.ohmi_envelope(r6, refpts=[request.source_element])
    r66 = np.asarray(env.r66[0], dtype=float)
    emittance = np.asarray(beam.mode_emittances[:2], dtype=float)
    size = np.sqrt(np.array([r66[0, 0], r66[2, 2]]))
    return EmittanceResult(
        emittance_m=emittance,
        size_m=size,
        snapshot_time=request.snapshot_time,
        compute_s=time.perf_counter() - t0,
        info={"rf_frequency_6d_hz": frequency},
    )


def true_c_minus(ring: at.Lattice, dct_m: float) -> float:
    """``|C-|`` of a (true) lattice at path lengthening ``dct_m`` (closest tune approach).

    The one-turn matrix of the closed orbit at ``dct_m`` (4D, pyAT ``find_m44`` on the orbit
    ``find_orbit4`` gives), through :func:`accplans.physics.closest_tune_approach`: the
    eigen-tunes brought together by an optics-transparent trombone, at the working point's
    optics.
    """
    orbit, _ = at.find_orbit4(ring, dct=dct_m)
    m44, _ = at.find_m44(ring, orbit=orbit)
    return float(closest_tune_approach(np.asarray(m44, dtype=float)).c_minus)


def scan_c_minus(
    ring: at.Lattice,
    dct_m: float,
    description: MachineDescription,
    per_unit: Mapping[str, float],
    crossing: float,
    half_width: float = 0.01,
) -> float:
    """``|C-|`` of a (true) lattice along a tune scan: the smallest eigen-tune distance.

    The scan adds ``t * per_unit[device]`` (1/m^2) to the gradient of every element of each
    device (the change a knob scan of ``measure_c_minus`` makes per unit of its parameter),
    for ``t`` within ``crossing +- half_width``. This is the closest tune approach an
    operator measures with the machine's tune knobs; :func:`true_c_minus` brings the tunes
    together with a trombone at one point instead, which differs from it when the coupling
    is distributed and the working point is far from the difference resonance.
    """
    elements = [
        (int(e), float(d))
        for name, d in per_unit.items()
        for e in description.device(name).elements
    ]
    scanned = ring.deepcopy()
    k0 = {e: float(scanned[e].PolynomB[1]) for e, _ in elements}

    def split(t: float) -> float:
        for e, d in elements:
            scanned[e].PolynomB[1] = k0[e] + t * d
        orbit, _ = at.find_orbit4(scanned, dct=dct_m)
        m44, _ = at.find_m44(scanned, orbit=orbit)
        q = eigen_tunes(np.asarray(m44, dtype=float))
        return float(abs(wrap_tune(q[0] - q[1])))

    found = minimize_scalar(
        split,
        bounds=(crossing - half_width, crossing + half_width),
        method="bounded",
        options={"xatol": 1e-8},
    )
    return float(found.fun)


class EmittanceServer:
    """The emittance monitor's records and their updates in the twin's IOC (module docstring).

    Args:
        twin: the twin.
        prefix: the machine's PV prefix.
        settings: the monitor's settings.
    """

    def __init__(self, twin: Twin, prefix: str, settings: EmittanceSettings | None = None) -> None:
        self.twin = twin
        self.settings = settings if settings is not None else EmittanceSettings()
        self.pvs = emittance_pvs(prefix)
        self.records: dict[str, Any] = {}
        self._result: EmittanceResult | None = None
        self._changed_at: float | None = time.time()  # the first values are due at start
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: Any = None
        self._counter = 0
        self._rng = np.random.default_rng([twin.seed, 0xE417])

    def create_records(self, builder: Any, name: Any) -> None:
        """Create the records (before ``iocInit``); ``name(pv, where)`` checks each PV name."""
        where = "emittance monitor"
        r = self.records
        p = self.pvs
        r["x"] = builder.aIn(name(p["x"], where), initial_value=0.0, PREC=4, EGU="pm rad")
        r["y"] = builder.aIn(name(p["y"], where), initial_value=0.0, PREC=5, EGU="pm rad")
        r["size_x"] = builder.aIn(name(p["size_x"], where), initial_value=0.0, PREC=4, EGU="um")
        r["size_y"] = builder.aIn(name(p["size_y"], where), initial_value=0.0, PREC=4, EGU="um")
        r["timestamp"] = builder.aIn(
            name(p["timestamp"], where), initial_value=0.0, PREC=6, EGU="s"
        )
        r["busy"] = builder.longIn(name(p["busy"], where), initial_value=0)
        r["counter"] = builder.longIn(name(p["counter"], where), initial_value=0)

    def start(self) -> None:
        """Start the update task on the running loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    async def stop(self) -> None:
        """Stop the task and the worker."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pool is not None:
            stop_pool(self._pool)
            self._pool = None

    def on_tick(self, now: float, *, changed: bool, idle: bool) -> None:
        """A model tick: ``changed`` magnets make the values stale; idle ticks add fresh noise."""
        if changed or self._result is None:
            if self._changed_at is None or changed:
                self._changed_at = now
            if self._wake is not None:
                self._wake.set()
        elif idle:
            self._publish()

    def reset(self) -> None:
        """The twin was reset: new noise seed, values stale."""
        self._rng = np.random.default_rng([self.twin.seed, 0xE417])
        self.on_tick(time.time(), changed=True, idle=False)

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._changed_at is not None:
                wait = self._changed_at + self.settings.quiet_s - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                snapshot = self._changed_at
                self._changed_at = None
                try:
                    await self._compute(snapshot)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the monitor kill the IOC
                    _log.exception("emittance computation failed")

    async def _compute(self, snapshot: float) -> None:
        if self._pool is None:
            self._pool = worker_pool()
        if not self.twin.has_beam:
            self._result = EmittanceResult(np.zeros(2), np.zeros(2), snapshot)
            self._publish()
            return
        request = emittance_request(self.twin, self.settings, snapshot)
        self.records["busy"].set(1)
        try:
            loop = asyncio.get_running_loop()
            self._result = await loop.run_in_executor(self._pool, compute_emittances, request)
        finally:
            self.records["busy"].set(0)
        self._publish()

    def _publish(self) -> None:
        result = self._result
        if result is None or not self.records:
            return
        noise = 1.0
        if self.twin.noise and self.settings.noise_rel > 0:
            noise = 1.0 + self.settings.noise_rel * self._rng.standard_normal(4)
        values = np.concatenate([result.emittance_m * 1e12, result.size_m * 1e6]) * noise
        if not self.twin.has_beam:
            values = np.zeros(4)
        r = self.records
        for key, v in zip(("x", "y", "size_x", "size_y"), values, strict=True):
            r[key].set(float(v))
        r["timestamp"].set(result.snapshot_time)
        self._counter += 1
        r["counter"].set(self._counter)
