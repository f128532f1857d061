"""Bluesky plans: procedures on devices, with the restore rules of DESIGN.md."""

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
from ._worker import compute, shutdown_workers
from .orbit import measure_orbit
from .orbit_correction import correct_orbit
from .orm import measure_orm
from .restore import restore_setpoints

__all__ = [
    "PLANS",
    "BeamLost",
    "PendingRestore",
    "PendingRestoreError",
    "Snapshot",
    "check_hardware_limits",
    "compute",
    "correct_orbit",
    "journal_dir",
    "measure_orbit",
    "measure_orm",
    "read_orbit_frame",
    "restore_on_exit",
    "restore_setpoints",
    "set_and_settle",
    "queueserver_plans",
    "set_family_hardware",
    "shutdown_workers",
    "take_snapshot",
]
