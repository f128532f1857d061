"""Command-line entry point: `accplans ...` (wiring only)."""


def main() -> None:
    """Run the accplans command line."""
    raise SystemExit("accplans: no commands yet")
