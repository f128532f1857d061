# pyright: reportUndefinedVariable=false
"""The machine, connected, and its families as top-level names (the queueserver passes
devices by these names): ``bpms``, ``hcorr``, ``vcorr``, ``quadrupoles``, ``sextupoles``,
``skew``, ``rf``, ``dcct``, ``tune`` (``None`` where the machine has none).
"""

from bluesky_queueserver import register_device

from accplans.config import load_description
from accplans.devices import connect_sync

description = load_description(ACCPLANS_MACHINE)
machine = connect_sync(
    description, ACCPLANS_MODE, address=ACCPLANS_ADDRESS, protocol=ACCPLANS_PROTOCOL
)
print(f"accplans profile: connected to {description.machine.id!r} ({ACCPLANS_MODE})")

bpms, hcorr, vcorr = machine.bpms, machine.hcorr, machine.vcorr
quadrupoles = getattr(machine, "quadrupoles", None)
sextupoles = getattr(machine, "sextupoles", None)
skew, rf, dcct, tune = machine.skew, machine.rf, machine.dcct, machine.tune

# The queueserver lists these devices without their members: subsets go through select=.
_top_level = ("machine", "bpms", "hcorr", "vcorr", "quadrupoles", "sextupoles", "skew")
for _name in (*_top_level, "rf", "dcct", "tune"):
    register_device(_name, depth=1)
