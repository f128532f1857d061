"""``python -m accplans.services feedback serve ...``."""

from ._cli import main

main()
