"""accplans.data."""
