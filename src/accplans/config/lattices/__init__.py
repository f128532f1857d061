"""Lattices shipped with accplans (see each module for its origin)."""
