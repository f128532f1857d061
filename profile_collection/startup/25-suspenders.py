# pyright: reportUndefinedVariable=false
"""Beam-loss suspension: ``beam_suspender`` suspends plans while the DCCT reads below
ACCPLANS_SUSPEND_BELOW_MA (mA, default 1; ``off``: no suspender) and resumes them from their
last checkpoint once it reads at least ACCPLANS_RESUME_ABOVE_MA (mA, default 10) for
ACCPLANS_RESUME_SLEEP s (default 5). See docs/how-to/suspend-on-beam-loss.md.
"""

import os

from accplans.plans import BeamCurrentSuspender

_below = os.environ.get("ACCPLANS_SUSPEND_BELOW_MA", "1")
beam_suspender = None
if machine.dcct is not None and _below.lower() != "off":
    beam_suspender = BeamCurrentSuspender(
        machine.dcct,
        threshold_ma=float(_below),
        resume_ma=float(os.environ.get("ACCPLANS_RESUME_ABOVE_MA", "10")),
        sleep=float(os.environ.get("ACCPLANS_RESUME_SLEEP", "5")),
    )
    RE.install_suspender(beam_suspender)
    print(f"accplans profile: {beam_suspender!r} installed")
