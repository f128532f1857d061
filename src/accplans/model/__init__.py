"""accplans.model."""
