"""accplans.services."""
