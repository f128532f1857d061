"""``python -m accplans.sim serve ...``: the twin's command line on its own."""

from ._cli import main

if __name__ == "__main__":
    main()
