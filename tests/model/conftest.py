"""Fixtures of the model tests: the built-in machines' descriptions, fresh lattices per test."""

from __future__ import annotations

import at
import pytest

from accplans.config import MachineDescription, build_lattice, load_description


@pytest.fixture(scope="session")
def small_desc() -> MachineDescription:
    return load_description("small")


@pytest.fixture(scope="session")
def ebs_desc() -> MachineDescription:
    return load_description("ebs")


@pytest.fixture(params=["small", pytest.param("ebs", marks=pytest.mark.ebs)])
def machine(request: pytest.FixtureRequest) -> tuple[MachineDescription, at.Lattice]:
    """Each built-in machine: its description and a fresh lattice (tests change it)."""
    desc = load_description(request.param)
    return desc, build_lattice(desc)
