"""Seeds of a federated run: one integer per (run, round, worker, stream), and per local
step for the data stream.

The in-process engine and the Flower apps draw masks (stream 0) and mini-batches with their
DSM noise (stream 1, one generator per local step: `step_seed`) from generators seeded
here, so a resumed run, or a SuperNode that only knows its partition id and the round,
redraws exactly what the uninterrupted in-process run drew, and a round's batches can be
drawn one step at a time in any order (`federated.batches`).
"""

import hashlib

MASKS = 0
DATA = 1
NOISE = 2  # differential privacy's Gaussian noise (`fedscore.privacy`)


def seed_for(run_seed: int, round_: int, worker: int, stream: int) -> int:
    """A distinct, reproducible seed for (run seed, round, worker, stream), in
    torch.Generator's range (reduced mod 2^63: unchanged for every seed below ~2^20, and a
    large run seed no longer overflows `manual_seed`)."""
    return (((run_seed * 1_000_003 + round_) * 10_007 + worker) * 7 + stream) % (1 << 63)


def step_seed(run_seed: int, round_: int, worker: int, step: int) -> int:
    """The seed of worker's mini-batch and DSM noise at local step `step` of round q: a
    63-bit hash of (run seed, round, worker, DATA, step), so any step count fits
    torch.Generator's seed range and distinct steps get unrelated streams."""
    key = f"{seed_for(run_seed, round_, worker, DATA)}:{step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def noise_seed(key: int, round_: int, worker: int, step: int = -1) -> int:
    """The seed of differential privacy's Gaussian noise in round q: worker >= 0 and step >= 0
    for DP-SGD's noise at a local step, step -1 for a worker's distributed share of
    DP-FedAvg's noise, worker -1 for the server's central noise. `key` is the privacy plan's
    secret (`privacy.plan.noise_key`), never the public run seed. A 63-bit hash like
    `step_seed`, on its own stream (NOISE), so training's draws are unchanged by privacy."""
    key = f"{key}:{round_}:{worker}:{NOISE}:{step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
