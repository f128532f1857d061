"""accplans.physics."""
