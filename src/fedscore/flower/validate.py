"""Is a Flower reply what its worker was sent? The server's checks, before eq. 8's sums.

A reply (`client_app.train`) holds a record "payload" (ArrayRecord: "values", the kept values
of every tensor in sorted-name order, and "mask", the packed bits of its top-k masks), a
record "meta" (ConfigRecord: partition-id, round, kinds: JSON {tensor: full|bits|seeded}),
a record "metrics" (MetricRecord: loss, ...) and optionally "runtime" (device, precision).
The server knows what that worker was sent (theta_q, round q) and everything its mask
depends on (the run's policy, the worker's keep ratio, the mask seed), so it can check all
of it (issue 16):

  layout   exactly those records and keys, nothing bigger than a full dense reply needs
           (sizes are read from the arrays' bytes, before numpy decodes them);
  meta     partition id an int of this run, round == q, kinds a JSON object naming exactly
           the model's tensors;
  masks    the kind every tensor must have (`expected_kind`), packed bits of exactly
           ceil(bits / 8) bytes, a top-k mask that keeps the k largest |theta_q| of each
           tensor, a random mask regenerated from its seed (a worker never chooses it);
  values   1-D float32 little-endian (never cast: an int or float64 array is refused),
           exactly as many as the masks keep, finite, small enough that N replies add up
           to a finite sum, and optionally an update norm within `federation.max_update_norm`;
  metrics  a finite loss, numbers only.

`check_reply` runs them in that order and returns a `Checked` reply (masks and kept values
per tensor, ready for `payload.add_kept`); any failure raises (`Rejected` with a reason that
names the problem, or whatever numpy / Flower raised on hostile bytes): the transport drops
the reply and nothing of it reaches the sums.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.federated.masks import kept_count
from fedscore.flower.payload import BITS, FULL, SEEDED

Params = dict[str, Tensor]

RECORDS = {"payload": ArrayRecord, "meta": ConfigRecord, "metrics": MetricRecord}
OPTIONAL_RECORDS = {"runtime": ConfigRecord}
META_KEYS = {"partition-id", "round", "kinds"}
METRIC_KEYS = {"loss", "kept", "num-examples", "payload-bytes", "train-seconds",
               "process-age-seconds", "prepare-seconds", "epsilon"}
RUNTIME_KEYS = {"device", "precision"}
RUNTIME_CHARS = 64  # a device or precision name; it is copied into the round record
NPY_HEADER = 4096  # bytes a .npy header may add to an array's data (numpy writes ~128)
WIRE_DTYPE = np.dtype("<f4")  # what `payload.encode` sends whatever the worker trained in
F32_MAX = float(np.finfo(np.float32).max)


class Rejected(FedscoreError):
    """A reply that does not fit what its worker was sent; the message says why."""


@dataclass
class Expected:
    """What the server sent in round q and what every reply must fit.

    theta: theta_q (CPU float32, name -> tensor); policy, ratios: the run's mask policy and
    each worker's keep ratio; regenerate(pid): worker pid's seeded masks (random policy);
    max_update_norm: the optional bound on || kept values - theta_q's ||_2."""

    q: int
    theta: Params
    policy: str
    ratios: list[float]
    regenerate: object  # Callable[[int], Params]
    max_update_norm: float | None = None

    def __post_init__(self):
        self.names = sorted(self.theta)
        self.numel = {k: self.theta[k].numel() for k in self.names}
        self.dense = sum(self.numel.values())
        self._abs: Params | None = None

    @property
    def workers(self) -> int:
        return len(self.ratios)

    def magnitudes(self) -> Params:
        """|theta_q| per tensor, flat, computed once per round (the top-k checks share it)."""
        if self._abs is None:
            self._abs = {k: self.theta[k].detach().reshape(-1).abs() for k in self.names}
        return self._abs


@dataclass
class Checked:
    """A reply that passed every check: eq. 8's inputs plus what the round record logs."""

    pid: int
    masks: dict[str, Tensor]  # bool, shaped like theta_q
    kept: dict[str, Tensor]  # float32, 1-D, the kept values in mask order
    loss: float
    train_seconds: float
    startup_seconds: float
    nbytes: int
    device: str
    epsilon: float | None = None
    """privacy mode sample: the worker's own epsilon after this round (its DP-SGD runs where
    its data are; the worker's report, logged as such)."""


def check_reply(reply: Message, e: Expected) -> Checked:
    """Every check of this module on one reply, cheapest first; raises on the first failure."""
    content = reply.content
    check_layout(content)
    pid, kinds = check_meta(content["meta"], e)
    loss, train_s, start_s = check_metrics(content["metrics"])
    epsilon = check_epsilon(content["metrics"])
    device = check_runtime(content["runtime"]) if "runtime" in content else ""
    arrays = content["payload"]
    masks = check_masks(arrays, kinds, pid, e)
    kept = check_values(arrays, masks, e)
    check_update_norm(kept, masks, e)
    nbytes = sum(len(a.data) for a in arrays.values())
    return Checked(pid, masks, kept, loss, train_s, start_s, nbytes, device, epsilon)


def check_layout(content) -> None:
    """Exactly the records a fedscore worker sends, each of its type, with known keys."""
    names = set(content.keys())
    if missing := sorted(set(RECORDS) - names):
        raise Rejected(f"reply has no record(s) {missing}")
    if extra := sorted(names - set(RECORDS) - set(OPTIONAL_RECORDS)):
        raise Rejected(f"reply has unexpected record(s) {extra}")
    for name, kind in (RECORDS | OPTIONAL_RECORDS).items():
        if name in names and not isinstance(content[name], kind):
            raise Rejected(f"reply record {name!r} is a {type(content[name]).__name__}, "
                           f"not a {kind.__name__}")
    _exact_keys("meta", set(content["meta"].keys()), META_KEYS, META_KEYS)
    _exact_keys("metrics", set(content["metrics"].keys()), {"loss"}, METRIC_KEYS)
    _exact_keys("payload", set(content["payload"].keys()), {"values"}, {"values", "mask"})


def _exact_keys(record: str, keys: set, required: set, allowed: set) -> None:
    if missing := sorted(required - keys):
        raise Rejected(f"reply {record} has no {missing}")
    if extra := sorted(keys - allowed, key=str):
        raise Rejected(f"reply {record} has unexpected key(s) {extra[:5]}")


def _int(value, what: str) -> int:
    # bool is an int to Python; a worker id or round of True is a forged reply
    if type(value) is not int:
        raise Rejected(f"{what} {value!r:.40} is not an integer")
    return value


def check_meta(meta: ConfigRecord, e: Expected) -> tuple[int, dict[str, str]]:
    """(partition id, mask kinds): the id a worker of this run, the round the one sent,
    the kinds a JSON object naming exactly the model's tensors, each with a known kind."""
    pid = _int(meta["partition-id"], "partition-id")
    if not 0 <= pid < e.workers:
        raise Rejected(f"partition-id {pid} is not a worker of this run (0..{e.workers - 1})")
    rnd = _int(meta["round"], "round")
    if rnd != e.q:
        raise Rejected(f"reply answers round {rnd + 1}, not round {e.q + 1}")
    text = meta["kinds"]
    # the longest honest kinds: every name with "seeded"; refuse more before parsing it
    limit = sum(len(k) + 16 for k in e.names) + 16
    if not isinstance(text, str) or len(text) > limit:
        raise Rejected(f"mask kinds are not a JSON text of at most {limit} characters")
    try:
        kinds = json.loads(text)
    except ValueError:
        raise Rejected("mask kinds are not JSON") from None
    if not isinstance(kinds, dict):
        raise Rejected("mask kinds are not a JSON object")
    if set(kinds) != set(e.names):
        missing, extra = sorted(set(e.names) - set(kinds)), sorted(set(kinds) - set(e.names))
        raise Rejected(f"mask kinds do not name the model's tensors (missing {missing[:3]}, "
                       f"unknown {extra[:3]})")
    if bad := sorted(k for k, v in kinds.items() if v not in (FULL, BITS, SEEDED)):
        raise Rejected(f"mask kind {kinds[bad[0]]!r:.40} of {bad[0]!r} is unknown")
    return pid, kinds


def _number(value, what: str) -> float:
    if type(value) not in (int, float):
        raise Rejected(f"{what} {value!r:.40} is not a number")
    return float(value)


def check_metrics(metrics: MetricRecord) -> tuple[float, float, float]:
    """(loss, train seconds, process age): numbers only, the loss finite (the seconds may
    be NaN: a worker off Linux cannot measure its process age)."""
    values = {k: _number(v, f"metric {k!r}") for k, v in metrics.items()}
    if not math.isfinite(values["loss"]):
        raise Rejected(f"non-finite loss {values['loss']}")
    return (values["loss"], values.get("train-seconds", math.nan),
            values.get("process-age-seconds", math.nan))


def check_epsilon(metrics: MetricRecord) -> float | None:
    """A worker's reported epsilon: absent, or a number >= 0 (inf allowed: no noise)."""
    if "epsilon" not in metrics:
        return None
    eps = _number(metrics["epsilon"], "metric 'epsilon'")
    if math.isnan(eps) or eps < 0:
        raise Rejected(f"epsilon {eps} is not a number >= 0")
    return eps


def check_runtime(runtime: ConfigRecord) -> str:
    """"device/precision" a worker says it trained on: two short strings."""
    _exact_keys("runtime", set(runtime.keys()), set(), RUNTIME_KEYS)
    for k, v in runtime.items():
        if not isinstance(v, str) or len(v) > RUNTIME_CHARS:
            raise Rejected(f"runtime {k!r} is not a name of at most {RUNTIME_CHARS} characters")
    return f"{runtime.get('device', '?')}/{runtime.get('precision', '?')}"


def expected_kind(policy: str, numel: int, ratio: float) -> str:
    """The kind `payload.encode` gives a tensor of `numel` coordinates: FULL when the
    policy keeps all of it (policy full, or k = numel: `masks.kept_count`), else SEEDED for
    random masks (the server regenerates them) and BITS for top-k masks."""
    if policy == "full" or kept_count(numel, ratio) == numel:
        return FULL
    return SEEDED if policy == "random" else BITS


def _array(arrays: ArrayRecord, key: str, limit: int) -> np.ndarray:
    """arrays[key] decoded, once its bytes are known to fit `limit` (never decode a 200 MB
    payload to find out it is too big)."""
    arr = arrays[key]
    if not isinstance(arr, Array) or len(arr.data) > limit + NPY_HEADER:
        raise Rejected(f"payload {key!r} holds {len(arr.data)} bytes (it says "
                       f"{arr.dtype} {arr.shape}), more than the {limit} its masks allow")
    try:
        return arr.numpy()  # np.load, allow_pickle=False: an object array is refused
    except (TypeError, ValueError, EOFError, OSError) as err:
        raise Rejected(f"payload {key!r} is not a numpy array ({err})") from None


def check_masks(arrays: ArrayRecord, kinds: dict[str, str], pid: int, e: Expected
                ) -> dict[str, Tensor]:
    """Worker pid's bool masks, each the one its policy and keep ratio make from theta_q."""
    ratio = e.ratios[pid]
    for name in e.names:
        want = expected_kind(e.policy, e.numel[name], ratio)
        if kinds[name] != want:
            raise Rejected(f"mask of {name!r} is {kinds[name]!r}, but policy {e.policy!r} "
                           f"at keep ratio {ratio:g} makes it {want!r}")
    bits = decode_bits(arrays, [k for k in e.names if kinds[k] == BITS], e)
    regen = e.regenerate(pid) if SEEDED in kinds.values() else {}
    masks = {}
    for name in e.names:
        shape = e.theta[name].shape
        if kinds[name] == FULL:
            masks[name] = torch.ones(shape, dtype=torch.bool)
        elif kinds[name] == SEEDED:
            masks[name] = regen[name].reshape(shape).cpu()
        else:
            masks[name] = check_topk(bits[name], name, ratio, e).reshape(shape)
    return masks


def decode_bits(arrays: ArrayRecord, names: list[str], e: Expected) -> dict[str, Tensor]:
    """The flat masks of kind BITS: uint8 packed bits, exactly ceil(bits / 8) bytes."""
    n_bits = sum(e.numel[k] for k in names)
    if not n_bits:
        if "mask" in arrays:
            raise Rejected("payload carries a mask but no tensor's kind is 'bits'")
        return {}
    if "mask" not in arrays:
        raise Rejected(f"payload has no mask, its kinds need {n_bits} bits")
    size = -(-n_bits // 8)
    packed = _array(arrays, "mask", size)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != size:
        raise Rejected(f"payload mask is {packed.dtype} of shape {packed.shape}, not uint8 "
                       f"of shape ({size},)")
    flat = torch.from_numpy(np.unpackbits(packed, count=n_bits).view(bool))
    return dict(zip(names, flat.split([e.numel[k] for k in names])))


def check_topk(mask: Tensor, name: str, ratio: float, e: Expected) -> Tensor:
    """A top-k mask (`masks.topk_mask`): k = kept_count coordinates, and none dropped larger
    in |theta_q| than one kept. Tie-tolerant: the masks module breaks ties by the lower flat
    index (a stable sort), but any choice among equal |theta_q| is as good, and this check is
    two masked passes instead of a sort of the tensor."""
    k = kept_count(e.numel[name], ratio)
    if int(mask.sum()) != k:
        raise Rejected(f"mask of {name!r} keeps {int(mask.sum())} coordinates, top-k at "
                       f"keep ratio {ratio:g} keeps {k}")
    a = e.magnitudes()[name]
    smallest_kept = torch.where(mask, a, math.inf).min()
    largest_dropped = torch.where(mask, -math.inf, a).max()
    if smallest_kept < largest_dropped:
        raise Rejected(f"mask of {name!r} is not theta_q's top-k: it drops |theta| "
                       f"{float(largest_dropped):.3g} and keeps {float(smallest_kept):.3g}")
    return mask


def check_values(arrays: ArrayRecord, masks: dict[str, Tensor], e: Expected
                 ) -> dict[str, Tensor]:
    """The kept values per tensor: 1-D float32 little-endian, one per kept coordinate,
    finite, and at most float32's max / N in size, so that eq. 8's sum of N replies is
    finite (a larger finite value would make the new model inf and stop the run)."""
    counts = [int(masks[k].sum()) for k in e.names]
    n = sum(counts)
    values = _array(arrays, "values", n * WIRE_DTYPE.itemsize)
    if values.dtype != WIRE_DTYPE or not values.dtype.isnative:
        raise Rejected(f"payload values are {values.dtype} ({values.dtype.str}), not "
                       f"float32 little-endian ({WIRE_DTYPE.str})")
    if values.ndim != 1 or values.size != n:
        raise Rejected(f"payload values have shape {values.shape}, the masks keep {n}")
    # max and -min: two passes without a temporary; NaN when any value is NaN
    top = max(float(values.max()), -float(values.min())) if n else 0.0
    if not top <= F32_MAX / e.workers:
        raise Rejected("non-finite values" if not math.isfinite(top)
                       else f"values as large as {top:.3g} (the sum of {e.workers} replies "
                       "would overflow float32)")
    return dict(zip(e.names, torch.from_numpy(values).split(counts)))


def check_update_norm(kept: dict[str, Tensor], masks: dict[str, Tensor], e: Expected) -> None:
    """|| kept values - theta_q at the kept coordinates ||_2 <= federation.max_update_norm
    (when set): a finite but hostile update (scaled, or one huge coordinate) is dropped."""
    if e.max_update_norm is None:
        return
    total = 0.0
    for name in e.names:
        before = e.theta[name].reshape(-1)[masks[name].reshape(-1)]
        # float32 is precise enough for a bound; an overflow is inf, refused below
        total += float(torch.linalg.vector_norm(kept[name] - before)) ** 2
    norm = math.sqrt(total)
    if not norm <= e.max_update_norm:
        raise Rejected(f"update norm {norm:.4g} exceeds federation.max_update_norm "
                       f"{e.max_update_norm:g}")
