"""Bluesky plans: procedures on devices, with the restore rules of DESIGN.md."""

from ._claims import Claim, ClaimError, claim, current_arbiter, release, use_arbiter
from ._queueserver import PLANS, queueserver_plans
from ._safety import (
    PendingRestore,
    PendingRestoreError,
    Snapshot,
    check_hardware_limits,
    journal_dir,
    restore_on_exit,
    take_snapshot,
)
from ._stubs import BeamLost, read_orbit_frame, set_and_settle, set_family_hardware
from ._suspenders import BeamCurrentSuspender, beam_suspender_installed
from ._worker import compute, shutdown_workers
from .bba import bba, bba_knobs
from .bumps import orbit_bump, remove_bump
from .c_minus import correct_c_minus, measure_c_minus
from .chromaticity import correct_chromaticity, measure_chromaticity
from .coupling import correct_coupling, measure_coupling
from .dispersion import measure_dispersion
from .feedback import orbit_feedback
from .fofb import design_fofb, export_fofb_matrices, plot_fofb_design, read_fofb_matrices
from .loco import correct_optics, loco, loco_fit
from .nonlinear import correct_nonlinear, measure_adts
from .optics_loading import load_optics
from .optics_tbt import correct_optics_tbt
from .orbit import measure_orbit
from .orbit_correction import correct_orbit
from .orm import measure_orm
from .restore import restore_setpoints
from .rf_frequency import correct_rf_frequency
from .snapshots import load_snapshot, save_setpoints, settable_families
from .standardize import standardize_magnets
from .tbt import measure_tbt
from .tunes import correct_tunes, measure_tunes

__all__ = [
    "PLANS",
    "bba",
    "bba_knobs",
    "BeamCurrentSuspender",
    "BeamLost",
    "beam_suspender_installed",
    "Claim",
    "ClaimError",
    "claim",
    "current_arbiter",
    "release",
    "use_arbiter",
    "PendingRestore",
    "PendingRestoreError",
    "Snapshot",
    "check_hardware_limits",
    "compute",
    "correct_nonlinear",
    "correct_optics_tbt",
    "correct_optics",
    "correct_orbit",
    "correct_rf_frequency",
    "design_fofb",
    "export_fofb_matrices",
    "plot_fofb_design",
    "read_fofb_matrices",
    "journal_dir",
    "loco",
    "loco_fit",
    "measure_adts",
    "measure_dispersion",
    "measure_orbit",
    "measure_orm",
    "measure_tbt",
    "orbit_bump",
    "remove_bump",
    "orbit_feedback",
    "read_orbit_frame",
    "restore_on_exit",
    "restore_setpoints",
    "standardize_magnets",
    "load_optics",
    "load_snapshot",
    "save_setpoints",
    "settable_families",
    "set_and_settle",
    "queueserver_plans",
    "set_family_hardware",
    "shutdown_workers",
    "take_snapshot",
    "correct_chromaticity",
    "correct_coupling",
    "measure_coupling",
    "correct_c_minus",
    "measure_c_minus",
    "correct_tunes",
    "measure_chromaticity",
    "measure_tunes",
]
