"""``python -m accplans.cli`` is ``accplans``."""

from . import main

main()
