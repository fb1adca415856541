"""Example programs for llmos: each runs with `llmos run userland/programs/NAME.py` (see README.md here)."""
