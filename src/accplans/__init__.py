"""accplans: a Bluesky-native middle layer for particle accelerators."""

__version__ = "0.1.0"
