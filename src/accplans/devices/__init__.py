"""accplans.devices."""
