"""The plans (``measure_orbit``, ``measure_orm``, ``restore_setpoints``, ...), as the
queueserver needs them: same names, docstrings and behaviour, with annotations it can read and
the names of this namespace's devices each parameter may take (accplans.plans.PLANS lists them).
"""

from accplans.plans import queueserver_plans

globals().update(queueserver_plans(globals()))
