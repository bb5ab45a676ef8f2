"""Seeds of a federated run: one integer per (run, round, worker, stream).

The in-process engine and the Flower apps draw masks (stream 0) and mini-batches with their
DSM noise (stream 1) from generators seeded here, so a resumed run, or a SuperNode that
only knows its partition id and the round, redraws exactly what the uninterrupted
in-process run drew.
"""

MASKS = 0
DATA = 1


def seed_for(run_seed: int, round_: int, worker: int, stream: int) -> int:
    """A distinct, reproducible seed for (run seed, round, worker, stream)."""
    return ((run_seed * 1_000_003 + round_) * 10_007 + worker) * 7 + stream
