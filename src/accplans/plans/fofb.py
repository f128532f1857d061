"""``design_fofb``: fast orbit feedback design (offline), its result kind, plot and HDF5 export.

The fast feedback runs at kHz rates in a facility's FPGA/DSP system, not in the twin: this plan
designs it from an orbit response matrix (a stored ORM result or the online model's), analyses
and simulates the loop (:mod:`accplans.physics` ``FofbPlane``), and records everything as a
``fofb_design`` result. It moves nothing. :func:`export_fofb_matrices` writes the matrices a
feedback system loads (HDF5, format in ``docs/how-to/design-fofb.md``);
:func:`read_fofb_matrices` reads them back; :func:`plot_fofb_design` draws the attenuation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import (
    FieldSpec,
    Result,
    ResultReadable,
    ResultSchema,
    load_result,
    register_result_kind,
    result_stream_name,
    run_metadata,
)
from accplans.devices import OrbitSource, SettableFamily, resolve_select
from accplans.model import OnlineModel
from accplans.physics import (
    DisturbanceSpectrum,
    FofbLoop,
    FofbPlane,
    design_fofb_plane,
    identify_sensitivity,
    measured_attenuation,
    realize_disturbance,
    simulate_fofb,
)

from ._safety import description_of, take_snapshot
from ._worker import compute

__all__ = [
    "FOFB_FILE_FORMAT",
    "design_fofb",
    "export_fofb_matrices",
    "fofb_design_fields",
    "handover_matrix",
    "plot_fofb_design",
    "read_fofb_matrices",
]

#: Name and version of the HDF5 matrix file (root attributes ``format`` and ``format_version``).
FOFB_FILE_FORMAT = ("accplans-fofb", 1)

_PLANES = ("x", "y")


def _plane_fields(p: str, corr: str, nm: str) -> dict[str, FieldSpec]:
    return {
        f"orm_{p}": FieldSpec("m/rad", f"(nbpm, {corr})"),
        f"inverse_{p}": FieldSpec("rad/m", f"({corr}, nbpm)"),
        # (ncorr, ncorr) flattened row-major: Tiled's writer names array axes by their size,
        # and a square array's two equal names break xarray's read-back
        f"handover_{p}": FieldSpec("", f"({corr}_sq,)"),
        f"singular_values_{p}": FieldSpec("m/rad", f"({nm},)"),
        f"mode_filter_{p}": FieldSpec("rad/m", f"({nm},)"),
        f"mode_gains_{p}": FieldSpec("", f"({nm},)"),
        f"handover_overlap_{p}": FieldSpec("", f"({nm},)"),
        f"alpha_{p}": FieldSpec("m/rad", "()"),
        f"attenuation_{p}": FieldSpec("dB", f"({nm}, nfreq)"),
        f"orbit_attenuation_{p}": FieldSpec("dB", "(nfreq,)"),
        f"simulated_{p}": FieldSpec("dB", f"({nm}, nsim)"),
        f"simulation_error_db_{p}": FieldSpec("dB", "()"),
        f"welch_{p}": FieldSpec("dB", "(nwelch,)"),
        f"welch_analytic_{p}": FieldSpec("dB", "(nwelch,)"),
        f"gain_margin_db_{p}": FieldSpec("dB", "()"),
        f"phase_margin_deg_{p}": FieldSpec("deg", "()"),
        f"peak_sensitivity_db_{p}": FieldSpec("dB", "()"),
        f"max_pole_{p}": FieldSpec("", "()"),
        f"dc_attenuation_db_{p}": FieldSpec("dB", "()"),
        f"bandwidth_hz_{p}": FieldSpec("Hz", "()"),
    }


def _check_design(values: Mapping[str, Any]) -> None:
    for p in _PLANES:
        if float(values[f"max_pole_{p}"]) >= 1:
            raise ValueError(f"plane {p}: the loop is unstable (max pole >= 1)")
    if float(values["sampling_hz"]) <= 0:
        raise ValueError("'sampling_hz' must be > 0")


FOFB_DESIGN_SCHEMA = register_result_kind(
    ResultSchema(
        kind="fofb_design",
        version=1,
        description=(
            "Fast orbit feedback design per plane (x: horizontal correctors, y: vertical): the "
            "ORM block it came from, the fast correction matrix (rows of slow correctors are "
            "0), the hand-over matrix to the slow correctors (rows slow, columns fast; stored "
            "flattened, see handover_matrix), the "
            "SVD modes with their filter and gains, the analytic attenuation per mode and of "
            "the orbit versus frequency, the time-domain simulation (multisine per mode and a "
            "Welch PSD ratio on the model disturbance), margins and loop settings."
        ),
        fields={
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "hcorr_names": FieldSpec("", "(nh,)", "str"),
            "vcorr_names": FieldSpec("", "(nv,)", "str"),
            "fast_h": FieldSpec("", "(nh,)", "bool"),
            "fast_v": FieldSpec("", "(nv,)", "bool"),
            "frequency": FieldSpec("Hz", "(nfreq,)"),
            "disturbance_psd": FieldSpec("m^2/Hz", "(nfreq,)"),
            "simulated_frequency": FieldSpec("Hz", "(nsim,)"),
            "welch_frequency": FieldSpec("Hz", "(nwelch,)"),
            **_plane_fields("x", "nh", "nmx"),
            **_plane_fields("y", "nv", "nmy"),
            "sampling_hz": FieldSpec("Hz", "()"),
            "latency": FieldSpec("", "()", "int"),
            "corrector_bandwidth_hz": FieldSpec("Hz", "()"),
            "slow_bandwidth_hz": FieldSpec("Hz", "()"),
            "kp": FieldSpec("", "()"),
            "ki": FieldSpec("", "()"),
            "handover_hz": FieldSpec("Hz", "()"),
            "method": FieldSpec("", "()", "str", choices=("tikhonov", "svd")),
            "orm_source": FieldSpec("", "()", "str"),
        },
        check=_check_design,
    )
)


def _db(value: np.ndarray | float) -> np.ndarray:
    return 20 * np.log10(np.maximum(np.asarray(value, float), 1e-300))


def _plane_result(
    p: str,
    plane: FofbPlane,
    fast: np.ndarray,
    frequency: np.ndarray,
    spectrum: DisturbanceSpectrum,
    n_samples: int,
    seed: int,
) -> dict[str, Any]:
    """The result fields of one plane: matrices in family order, tables, simulation, margins."""
    ncorr = fast.size
    inverse = np.zeros((ncorr, plane.nbpm))
    inverse[fast] = plane.inverse
    handover = np.zeros((ncorr, ncorr))
    if plane.response_slow.shape[1]:
        handover[np.ix_(~fast, fast)] = plane.handover
    orm = np.zeros((plane.nbpm, ncorr))
    orm[:, fast] = plane.response_fast
    orm[:, ~fast] = plane.response_slow
    margins = plane.margins()
    disturbance, mode_power = realize_disturbance(plane, spectrum, n_samples, seed=seed)
    sim = simulate_fofb(plane, disturbance)
    welch = measured_attenuation(plane, disturbance, sim["orbit"], nperseg=min(1024, n_samples))
    ident = identify_sensitivity(plane, n_period=4096, seed=seed)
    analytic_id = plane.sensitivity(ident["frequency"])
    error = np.nanmax(np.abs(_db(ident["mode"]) - _db(analytic_id)))
    orbit = plane.orbit_attenuation(frequency, mode_power)
    above = np.flatnonzero(orbit >= 1.0)
    return {
        f"orm_{p}": orm,
        f"inverse_{p}": inverse,
        f"handover_{p}": handover.ravel(),
        f"singular_values_{p}": plane.singular_values,
        f"mode_filter_{p}": plane.mode_filter,
        f"mode_gains_{p}": plane.mode_gains,
        f"handover_overlap_{p}": plane.handover_overlap,
        f"alpha_{p}": plane.alpha,
        f"attenuation_{p}": _db(plane.sensitivity(frequency)),
        f"orbit_attenuation_{p}": _db(orbit),
        f"simulated_{p}": _db(ident["mode"]),
        f"simulation_error_db_{p}": float(error),
        f"welch_{p}": _db(welch["orbit"]),
        f"welch_analytic_{p}": _db(plane.orbit_attenuation(welch["frequency"], mode_power)),
        f"gain_margin_db_{p}": margins.gain_margin_db
        if np.isfinite(margins.gain_margin_db)
        else np.nan,
        f"phase_margin_deg_{p}": margins.phase_margin_deg,
        f"peak_sensitivity_db_{p}": margins.peak_sensitivity_db,
        f"max_pole_{p}": margins.max_pole,
        f"dc_attenuation_db_{p}": float(-_db(orbit[0])),
        f"bandwidth_hz_{p}": float(frequency[above[0]]) if above.size else np.nan,
        "_simulated_frequency": ident["frequency"],
        "_welch_frequency": welch["frequency"],
    }


def fofb_design_fields(
    blocks: Mapping[str, np.ndarray],
    fast: Mapping[str, np.ndarray],
    loop: FofbLoop,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Design, analyse and simulate both planes; the ``fofb_design`` fields (a worker job).

    Args:
        blocks: ``{"x": (nbpm, nh), "y": (nbpm, nv)}`` diagonal ORM blocks [m/rad].
        fast: ``{"x": (nh,), "y": (nv,)}`` booleans: the fast correctors.
        loop: the loop settings.
        options: ``method``, ``alpha`` (fraction of each plane's largest singular value),
            ``n_singular`` (per plane tuple), ``mode_gains`` (per plane tuple), ``f_min_hz``,
            ``n_frequencies``, ``n_samples``, ``seed``, ``min_gain_margin_db``,
            ``min_phase_margin_deg``, ``spectrum`` (a :class:`DisturbanceSpectrum`).

    Raises:
        FofbUnstable: a plane's loop is unstable or below the margins asked.
    """
    fs = loop.sampling_hz
    frequency = np.geomspace(options["f_min_hz"], fs / 2, options["n_frequencies"])
    spectrum: DisturbanceSpectrum = options["spectrum"]
    out: dict[str, Any] = {"frequency": frequency, "disturbance_psd": spectrum.psd(frequency)}
    for i, p in enumerate(_PLANES):
        r, mask = np.asarray(blocks[p], float), np.asarray(fast[p], bool)
        smax = float(np.linalg.norm(r[:, mask], 2))
        method = options["method"]
        alpha = None if method == "svd" else float(options["alpha"]) * smax
        plane = design_fofb_plane(
            r[:, mask],
            r[:, ~mask],
            loop,
            method=method,
            alpha=alpha,
            n_singular=options["n_singular"][i],
            mode_gains=options["mode_gains"][i],
            min_gain_margin_db=options["min_gain_margin_db"],
            min_phase_margin_deg=options["min_phase_margin_deg"],
        )
        fields = _plane_result(
            p, plane, mask, frequency, spectrum, options["n_samples"], options["seed"] + i
        )
        out["simulated_frequency"] = fields.pop("_simulated_frequency")
        out["welch_frequency"] = fields.pop("_welch_frequency")
        out.update(fields)
    return out


def model_plane_blocks(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    hcorr_names: Sequence[str],
    vcorr_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """The online model's diagonal ORM blocks at these setpoints [m/rad] (a worker job)."""
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    matrix = model.orm(list(bpm_names), [*hcorr_names, *vcorr_names], rf=False).matrix
    n, nh = len(bpm_names), len(hcorr_names)
    return {"x": matrix[:n, :nh], "y": matrix[n:, nh:]}


def _load_orm_from_env(uid: str) -> Result:
    """Load an ORM result from ``$TILED_URI`` with ``$TILED_API_KEY`` (a worker job)."""
    from tiled.client import from_uri

    uri = os.environ.get("TILED_URI")
    if not uri:
        raise ValueError(
            f"design_fofb(orm={uid!r}): give the ORM as a Result (load_result) or set "
            "TILED_URI (and TILED_API_KEY) so the plan can load it"
        )
    client = from_uri(uri, api_key=os.environ.get("TILED_API_KEY") or None)
    try:
        return load_result(client, uid, "orm")
    finally:
        client.context.close()


def stored_plane_blocks(
    orm: Result,
    bpm_names: Sequence[str],
    hcorr_names: Sequence[str],
    vcorr_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """The diagonal blocks of a stored ``orm`` result for these BPMs and correctors [m/rad].

    Raises:
        ValueError: not an ORM, a BPM or corrector it lacks, or NaN in the blocks used (named).
    """
    if orm.kind != "orm":
        raise ValueError(f"design_fofb needs an 'orm' result, got {orm.kind!r} (run {orm.uid})")
    rows = list(orm["bpm_names"])
    cols = list(orm["corrector_names"])
    matrix = np.asarray(orm["matrix"], float)
    missing_b = [n for n in bpm_names if n not in rows]
    missing_c = [n for n in [*hcorr_names, *vcorr_names] if n not in cols]
    if missing_b or missing_c:
        raise ValueError(
            f"ORM {orm.uid} lacks BPMs {missing_b[:10]} and correctors {missing_c[:10]}: "
            "measure it with every corrector of both families (or select fewer)"
        )
    nrow = len(rows)
    bi = [rows.index(n) for n in bpm_names]
    out = {
        "x": matrix[np.ix_(bi, [cols.index(n) for n in hcorr_names])],
        "y": matrix[np.ix_([nrow + i for i in bi], [cols.index(n) for n in vcorr_names])],
    }
    for p, names in (("x", hcorr_names), ("y", vcorr_names)):
        bad = np.argwhere(~np.isfinite(out[p]))
        if bad.size:
            where = sorted({(bpm_names[i], names[j]) for i, j in bad[:10]})
            raise ValueError(
                f"ORM {orm.uid}: plane {p} is not finite at (BPM, corrector) {where}: "
                "deselect those BPMs (bpm_select) or remeasure"
            )
    return out


def design_fofb(
    bpms: OrbitSource,
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    *,
    orm: Result | str | None = None,
    fast_correctors: Any = None,
    bpm_select: Any = None,
    sampling_hz: float = 10e3,
    latency: int = 2,
    corrector_bandwidth_hz: float = 1e3,
    kp: float = 0.0,
    ki: float = 0.1,
    handover_hz: float = 5.0,
    slow_bandwidth_hz: float = 20.0,
    method: str = "tikhonov",
    alpha: float = 0.01,
    n_singular: int | None = None,
    min_gain_margin_db: float = 6.0,
    min_phase_margin_deg: float = 30.0,
    f_min_hz: float = 0.1,
    n_frequencies: int = 200,
    n_samples: int = 8192,
    seed: int = 0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Design the fast orbit feedback offline and record it as a ``fofb_design`` result.

    Per plane, the fast correction matrix is the regularised inverse (Tikhonov or truncated
    SVD) of the fast correctors' ORM block; each SVD mode is a scalar PI loop with the
    corrector's bandwidth and the BPM latency. The other correctors of each family are the
    slow ones: below ``handover_hz`` the fast correctors' DC part is handed over to them
    (mid-ranging), so the fast correctors' DC output goes to zero. The plan computes (in the
    worker process) the analytic attenuation per mode and of the orbit versus frequency, the
    stability margins, a time-domain simulation on the full matrices (a multisine per mode, and
    a Welch PSD ratio on a model disturbance: ground motion ~1/f^2 and lines at 25 and 50 Hz),
    and refuses an unstable design (or one below the margins) with an error before any run.

    Moves nothing and changes nothing on the machine: it only reads the corrector setpoints
    (for the online model's ORM).

    Args:
        bpms: the BPM family (rows of the matrices).
        hcorr: the horizontal corrector family.
        vcorr: the vertical corrector family.
        orm: a stored ``orm`` result (``load_result(client, uid, "orm")``) or its uid (loaded
            from ``$TILED_URI`` with ``$TILED_API_KEY``); by default the online model's ORM at
            the current setpoints.
        fast_correctors: the fast correctors (names, indices or a mask over ``hcorr`` then
            ``vcorr`` members); all by default (then there is no hand-over).
        bpm_select: BPMs the feedback reads (names, indices or a mask); all by default.
        sampling_hz: loop rate (Hz).
        latency: BPM-to-corrector latency (samples), besides the corrector's one-sample hold.
        corrector_bandwidth_hz: -3 dB bandwidth of the fast correctors (Hz).
        kp: proportional gain of the PI.
        ki: integral gain per sample (the 0 dB crossover is near ki * sampling_hz / 2 pi).
        handover_hz: crossover of the hand-over to the slow correctors (Hz); 0 for none.
        slow_bandwidth_hz: -3 dB bandwidth of the slow correctors (Hz).
        method: ``"tikhonov"`` or ``"svd"`` (truncated).
        alpha: Tikhonov parameter as a fraction of each plane's largest singular value.
        n_singular: modes kept per plane (both methods); all by default.
        min_gain_margin_db: refuse a design with a smaller gain margin (dB).
        min_phase_margin_deg: refuse a design with a smaller phase margin (deg).
        f_min_hz: lowest frequency of the attenuation table (Hz): its "DC" attenuation.
        n_frequencies: points of the table (log-spaced up to sampling_hz / 2).
        n_samples: samples of the disturbance simulation.
        seed: random seed of the simulated disturbance.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run; its ``result_fofb_design`` stream loads with
        ``load_result(client, uid, "fofb_design")``.
    """
    description = description_of(bpms, hcorr, vcorr)
    loop = FofbLoop(
        sampling_hz=sampling_hz,
        latency=latency,
        corrector_bandwidth_hz=corrector_bandwidth_hz,
        kp=kp,
        ki=ki,
        handover_hz=handover_hz,
        slow_bandwidth_hz=slow_bandwidth_hz,
    )
    if method not in ("tikhonov", "svd"):
        raise ValueError(f"design_fofb: unknown method {method!r}; use 'tikhonov' or 'svd'")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"design_fofb: alpha must be a fraction >= 0, got {alpha!r}")
    if not (np.isfinite(f_min_hz) and 0 < f_min_hz < sampling_hz / 2):
        raise ValueError(f"design_fofb: f_min_hz must be in (0, sampling_hz/2), got {f_min_hz}")
    if n_frequencies < 2 or n_samples < 256:
        raise ValueError("design_fofb: n_frequencies >= 2 and n_samples >= 256 are needed")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    bpm_names = [str(bpms.names[int(i)]) for i in rows]
    h_names, v_names = [str(n) for n in hcorr.names], [str(n) for n in vcorr.names]
    chosen = resolve_select(fast_correctors, [*h_names, *v_names], owner="fast_correctors")
    is_fast = np.zeros(len(h_names) + len(v_names), bool)
    is_fast[np.asarray(chosen, int)] = True
    fast = {"x": is_fast[: len(h_names)], "y": is_fast[len(h_names) :]}
    for p, fam in (("x", hcorr), ("y", vcorr)):
        if not fast[p].any():
            raise ValueError(f"design_fofb: no fast corrector chosen in {fam.name} (plane {p})")
    options = {
        "method": method,
        "alpha": alpha,
        "n_singular": (n_singular, n_singular),
        "mode_gains": (None, None),
        "f_min_hz": f_min_hz,
        "n_frequencies": int(n_frequencies),
        "n_samples": int(n_samples),
        "seed": int(seed),
        "min_gain_margin_db": min_gain_margin_db,
        "min_phase_margin_deg": min_phase_margin_deg,
        "spectrum": DisturbanceSpectrum(),
    }
    source = "model" if orm is None else (orm if isinstance(orm, str) else orm.uid)
    _md = run_metadata(
        description,
        plan_name="design_fofb",
        plan_args={
            "bpms": bpms.name,
            "hcorr": hcorr.name,
            "vcorr": vcorr.name,
            "orm": source,
            "fast_correctors": repr(fast_correctors),
            "bpm_select": repr(bpm_select),
            "sampling_hz": sampling_hz,
            "latency": latency,
            "corrector_bandwidth_hz": corrector_bandwidth_hz,
            "kp": kp,
            "ki": ki,
            "handover_hz": handover_hz,
            "slow_bandwidth_hz": slow_bandwidth_hz,
            "method": method,
            "alpha": alpha,
            "n_singular": n_singular,
            "min_gain_margin_db": min_gain_margin_db,
            "min_phase_margin_deg": min_phase_margin_deg,
            "f_min_hz": f_min_hz,
            "n_frequencies": n_frequencies,
            "n_samples": n_samples,
            "seed": seed,
        },
        units={"sampling_hz": "Hz", "corrector_bandwidth_hz": "Hz", "handover_hz": "Hz"},
        num_points=1,
        bpm_names=bpm_names,
        corrector_names=[*h_names, *v_names],
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        if orm is None:
            snapshot = yield from take_snapshot(description, [hcorr, vcorr])
            hardware = {n: v for f in snapshot.setpoints.values() for n, v in f.items()}
            blocks = yield from compute(
                model_plane_blocks, description, hardware, bpm_names, h_names, v_names
            )
        else:
            stored = (
                orm if isinstance(orm, Result) else (yield from compute(_load_orm_from_env, orm))
            )
            blocks = stored_plane_blocks(stored, bpm_names, h_names, v_names)
        fields = yield from compute(fofb_design_fields, blocks, fast, loop, options)

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            yield from bps.create(result_stream_name("fofb_design"))
            yield from bps.read(
                ResultReadable(
                    "fofb_design",
                    bpm_names=bpm_names,
                    hcorr_names=h_names,
                    vcorr_names=v_names,
                    fast_h=fast["x"],
                    fast_v=fast["y"],
                    sampling_hz=loop.sampling_hz,
                    latency=np.int64(loop.latency),
                    corrector_bandwidth_hz=loop.corrector_bandwidth_hz,
                    slow_bandwidth_hz=loop.slow_bandwidth_hz,
                    kp=loop.kp,
                    ki=loop.ki,
                    handover_hz=loop.handover_hz,
                    method=method,
                    orm_source=source,
                    **fields,
                )
            )
            yield from bps.save()

        return cast(str, (yield from run()))  # run_decorator returns the run's uid

    return (yield from plan())


# -- export, read-back, plot -----------------------------------------------------------------


def export_fofb_matrices(result: Result, path: str | Path) -> Path:
    """Write the matrices of a ``fofb_design`` result to an HDF5 file a feedback system loads.

    Layout (SI units in each dataset's ``units`` attribute; names as UTF-8 strings)::

        /                      attrs: format="accplans-fofb", format_version=1, created (ISO
                               8601 UTC), design_uid, orm_source, machine_id, config_hash,
                               method, accplans_version
        /loop                  attrs: sampling_hz, latency_samples, corrector_bandwidth_hz,
                               slow_bandwidth_hz, kp, ki, handover_hz
        /bpm_names             (nbpm,) the rows' BPMs, in order
        /x, /y                 one group per plane (x: horizontal correctors), each with
          fast_names           (nf,) fast correctors, in order
          slow_names           (ns,) slow correctors, in order (may be empty)
          inverse              (nf, nbpm) rad/m: fast setpoint change = -PI(inverse @ orbit)
          handover             (ns, nf) rad/rad: slow kicks that make a fast pattern's orbit
          orm_fast, orm_slow   (nbpm, nf), (nbpm, ns) m/rad: the ORM blocks used
          singular_values      (nm,) m/rad; mode_filter (nm,) rad/m; mode_gains (nm,)
          attrs                alpha (m/rad), gain_margin_db, phase_margin_deg,
                               dc_attenuation_db, bandwidth_hz

    Args:
        result: a ``fofb_design`` result (:func:`~accplans.data.load_result`).
        path: the file to write (overwritten).

    Returns:
        The path written.
    """
    import h5py

    if result.kind != "fofb_design":
        raise ValueError(f"export_fofb_matrices needs a 'fofb_design' result, got {result.kind!r}")
    from importlib.metadata import version

    path = Path(path)
    d = result.data
    start = result.metadata.get("start", {})
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format=FOFB_FILE_FORMAT[0],
            format_version=FOFB_FILE_FORMAT[1],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            design_uid=result.uid,
            orm_source=str(d["orm_source"]),
            machine_id=str((start.get("machine") or {}).get("id", "")),
            config_hash=str(start.get("config_hash", "")),
            method=str(d["method"]),
            accplans_version=version("accplans"),
        )
        loop = f.create_group("loop")
        loop.attrs.update(
            sampling_hz=float(d["sampling_hz"]),
            latency_samples=int(d["latency"]),
            corrector_bandwidth_hz=float(d["corrector_bandwidth_hz"]),
            slow_bandwidth_hz=float(d["slow_bandwidth_hz"]),
            kp=float(d["kp"]),
            ki=float(d["ki"]),
            handover_hz=float(d["handover_hz"]),
        )
        f.create_dataset("bpm_names", data=np.array(d["bpm_names"], dtype=object), dtype=text)
        for p, names, mask in (
            ("x", d["hcorr_names"], d["fast_h"]),
            ("y", d["vcorr_names"], d["fast_v"]),
        ):
            g = f.create_group(p)
            fast = np.asarray(mask, bool)
            names = np.array(names, dtype=object)
            g.create_dataset("fast_names", data=names[fast], dtype=text)
            g.create_dataset("slow_names", data=names[~fast], dtype=text)
            orm = np.asarray(d[f"orm_{p}"])
            for key, value, unit in (
                ("inverse", np.asarray(d[f"inverse_{p}"])[fast], "rad/m"),
                ("handover", handover_matrix(result, p)[np.ix_(~fast, fast)], "rad/rad"),
                ("orm_fast", orm[:, fast], "m/rad"),
                ("orm_slow", orm[:, ~fast], "m/rad"),
                ("singular_values", d[f"singular_values_{p}"], "m/rad"),
                ("mode_filter", d[f"mode_filter_{p}"], "rad/m"),
                ("mode_gains", d[f"mode_gains_{p}"], ""),
            ):
                g.create_dataset(key, data=np.asarray(value, float)).attrs["units"] = unit
            g.attrs.update(
                alpha=float(d[f"alpha_{p}"]),
                gain_margin_db=float(d[f"gain_margin_db_{p}"]),
                phase_margin_deg=float(d[f"phase_margin_deg_{p}"]),
                dc_attenuation_db=float(d[f"dc_attenuation_db_{p}"]),
                bandwidth_hz=float(d[f"bandwidth_hz_{p}"]),
            )
    return path


def handover_matrix(result: Result, plane: str) -> np.ndarray:
    """The hand-over matrix of ``plane`` (``"x"``/``"y"``) of a ``fofb_design`` result.

    Returns:
        (ncorr, ncorr) [rad/rad] over the plane's family: rows slow correctors, columns fast
        ones (stored flattened in the result).
    """
    n = len(result.data["hcorr_names" if plane == "x" else "vcorr_names"])
    return np.asarray(result.data[f"handover_{plane}"], float).reshape(n, n)


def read_fofb_matrices(path: str | Path) -> dict[str, Any]:
    """Read a file of :func:`export_fofb_matrices`.

    Returns:
        ``{"attrs": {...}, "loop": {...}, "bpm_names": [...], "x": {...}, "y": {...}}``: each
        plane holds its datasets (numpy arrays; names as ``list[str]``) and ``attrs``.

    Raises:
        ValueError: not an accplans FOFB file, or a format version this code does not read.
    """
    import h5py

    with h5py.File(Path(path), "r") as f:
        fmt = f.attrs.get("format")
        ver = f.attrs.get("format_version")
        if fmt != FOFB_FILE_FORMAT[0] or int(ver if ver is not None else -1) != FOFB_FILE_FORMAT[1]:
            raise ValueError(
                f"{path}: not an {FOFB_FILE_FORMAT[0]} v{FOFB_FILE_FORMAT[1]} file "
                f"(format={fmt!r}, version={ver!r})"
            )
        out: dict[str, Any] = {
            "attrs": {k: _plain(v) for k, v in f.attrs.items()},
            "loop": {k: _plain(v) for k, v in f["loop"].attrs.items()},
            "bpm_names": [
                s.decode() if isinstance(s, bytes) else str(s) for s in f["bpm_names"][()]
            ],
        }
        for p in _PLANES:
            g = f[p]
            plane: dict[str, Any] = {"attrs": {k: _plain(v) for k, v in g.attrs.items()}}
            for key in g:
                data = g[key][()]
                if key.endswith("_names"):
                    plane[key] = [s.decode() if isinstance(s, bytes) else str(s) for s in data]
                else:
                    plane[key] = np.asarray(data, float)
            out[p] = plane
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def plot_fofb_design(result: Result, path: str | Path) -> Path:
    """Draw a ``fofb_design`` result to a PNG: attenuation versus frequency, both planes.

    Per plane: the analytic ``|S|`` of every mode (thin lines), the orbit attenuation on the
    model disturbance (thick), the time-domain multisine points and the Welch PSD ratio of the
    simulation. Needs matplotlib (``pip install matplotlib``).

    Args:
        result: a ``fofb_design`` result.
        path: the PNG to write.

    Returns:
        The path written.
    """
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_fofb_design needs matplotlib: pip install matplotlib") from exc
    d = result.data
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, p in zip(axes, _PLANES, strict=True):
        f = np.asarray(d["frequency"])
        modes = np.asarray(d[f"attenuation_{p}"])
        for k, row in enumerate(modes):
            ax.semilogx(f, row, color="0.75", lw=0.6, label="modes |S_k|" if k == 0 else None)
        ax.semilogx(f, d[f"orbit_attenuation_{p}"], color="C0", lw=2, label="orbit (analytic)")
        fs = np.asarray(d["simulated_frequency"])
        sim = np.asarray(d[f"simulated_{p}"])
        ax.semilogx(fs, sim.T, ".", color="C1", ms=2)
        ax.semilogx([], [], ".", color="C1", label="modes, simulated (multisine)")
        ax.semilogx(
            d["welch_frequency"],
            d[f"welch_{p}"],
            color="C3",
            lw=1,
            alpha=0.8,
            label="orbit, simulated (Welch)",
        )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("frequency (Hz)")
        ax.set_title(
            f"plane {p}: GM {d[f'gain_margin_db_{p}']:.1f} dB, PM "
            f"{d[f'phase_margin_deg_{p}']:.0f} deg, DC {d[f'dc_attenuation_db_{p}']:.0f} dB"
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("attenuation |S| (dB)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"FOFB design {result.uid[:8]}: {d['sampling_hz'] / 1e3:g} kHz, latency {d['latency']} "
        f"samples, corrector {d['corrector_bandwidth_hz']:g} Hz, hand-over {d['handover_hz']:g} Hz"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary(result: Result) -> str:
    """A few lines describing a design (for the CLI)."""
    d = result.data
    lines = [f"fofb_design {result.uid}: ORM {d['orm_source']}, method {d['method']}"]
    for p, mask in (("x", d["fast_h"]), ("y", d["fast_v"])):
        lines.append(
            f"  {p}: {int(np.sum(mask))} fast / {len(mask)} correctors, GM "
            f"{d[f'gain_margin_db_{p}']:.1f} dB, PM {d[f'phase_margin_deg_{p}']:.1f} deg, DC "
            f"attenuation {d[f'dc_attenuation_db_{p}']:.1f} dB, 0 dB at "
            f"{d[f'bandwidth_hz_{p}']:.0f} Hz, simulation vs analytic "
            f"{d[f'simulation_error_db_{p}']:.2g} dB"
        )
    return "\n".join(lines)
