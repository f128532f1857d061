"""accplans.sim."""
