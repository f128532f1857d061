"""accplans.plans."""
