"""Flower wiring: the same local update (eq. 7) and aggregation (eq. 8) over a real
SuperLink and SuperNodes. This package only moves bytes and configs."""
