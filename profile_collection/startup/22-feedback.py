# pyright: reportUndefinedVariable=false
"""The orbit feedback service as the arbiter of every plan's claims (ACCPLANS_FEEDBACK set).

Plans then claim what they move from the feedback before moving it (it pauses, excludes or
folds) and release it however they end; ``feedback`` is its client (enable, gains, state).
"""

from bluesky.run_engine import call_in_bluesky_event_loop

from accplans.devices import FeedbackClient
from accplans.plans import use_arbiter

feedback = None
if ACCPLANS_FEEDBACK:
    _prefix = None if ACCPLANS_FEEDBACK.lower() in ("1", "on", "yes") else ACCPLANS_FEEDBACK
    feedback = FeedbackClient(description, prefix=_prefix, protocol=ACCPLANS_PROTOCOL)
    call_in_bluesky_event_loop(feedback.connect(timeout=10))
    use_arbiter(feedback)
    print(f"accplans profile: plans claim from the orbit feedback at {feedback.prefix}")
