"""Experiments built from the library: scaling-law sweeps and the reverse curse."""
