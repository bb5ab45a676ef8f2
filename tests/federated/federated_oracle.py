"""The reference implementation of a federated round, written the plain way, as the oracle
for the engine's tests: per-worker loops with torch.autograd and torch.optim on leaf tensors,
and eq. 8 as a python loop over coordinates. Nothing here is imported from
fedscore.federated's update or aggregation code."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyScoreNet(nn.Module):
    """A 2-layer MLP score net, net(x, t, y=None) -> (B, d), input cat([x, t[:, None]]),
    with a 0-d output scale so that scalar parameters go through every path too."""

    def __init__(self, dim: int = 3, hidden: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(dim + 1, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.scale * self.fc2(torch.tanh(self.fc1(torch.cat([x, t[:, None]], dim=1))))


def tiny_loss(net, batch) -> Tensor:
    """A DSM-like loss on batch (x0 (B, d), t (B,), eps (B, d)): ||net(x_t, t) - eps||^2."""
    x0, t, eps = batch
    xt = torch.exp(-t)[:, None] * x0 + torch.sqrt(1 - torch.exp(-2 * t))[:, None] * eps
    return (net(xt, t) - eps).pow(2).sum(1).mean()


def oracle_aggregate(
    params: dict[str, Tensor], worker_params: list[dict], masks: list[dict], uncovered: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Eq. 8 one coordinate at a time with python floats."""
    new, coverage = {}, {}
    for name, theta in params.items():
        flat = theta.reshape(-1).tolist()
        out, cov = [], []
        for i in range(len(flat)):
            kept = [float(w[name].reshape(-1)[i]) for w, m in zip(worker_params, masks)
                    if bool(m[name].reshape(-1)[i])]
            cov.append(len(kept))
            if kept:
                out.append(sum(kept) / len(kept))
            elif uncovered == "keep":
                out.append(flat[i])
            elif uncovered == "zero":
                out.append(0.0)
            else:
                raise ValueError("uncovered coordinate")
        new[name] = torch.tensor(out, dtype=theta.dtype).reshape(theta.shape)
        coverage[name] = torch.tensor(cov).reshape(theta.shape)
    return new, coverage


class OracleWorker:
    """One worker as research code writes it: its own leaf tensors and torch.optim optimiser.

    Pruned coordinates: the gradient is masked (eq. 7) and, for Adam, the coordinates are
    put back to zero after each step (the masked-update rule: they never move)."""

    def __init__(self, params: dict[str, Tensor], optimizer: str, lr: float, keep_state: bool):
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.kind, self.lr, self.keep_state = optimizer, lr, keep_state
        self.opt = self._new_opt()

    def _new_opt(self):
        ps = list(self.params.values())
        if self.kind == "sgd":
            return torch.optim.SGD(ps, lr=self.lr)
        return torch.optim.Adam(ps, lr=self.lr, betas=(0.9, 0.999), eps=1e-8)

    def train(self, theta_q: dict, mask: dict, batches: list, loss_fn) -> list[float]:
        if not self.keep_state:
            self.opt = self._new_opt()
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(theta_q[k] * mask[k])
        losses = []
        for batch in batches:
            loss = loss_fn(self.params, batch)
            grads = torch.autograd.grad(loss, list(self.params.values()))
            for (k, p), g in zip(self.params.items(), grads):
                p.grad = g * mask[k]
            self.opt.step()
            with torch.no_grad():
                for k, p in self.params.items():
                    p.mul_(mask[k])
            losses.append(float(loss.detach()))
        return losses


def oracle_round(workers, theta_q, masks, batches, loss_fn, uncovered="keep"):
    """One round: every worker trains from theta_q ⊙ m_n, then eq. 8 by python loops.
    masks: list of per-worker dicts; batches: list (workers) of lists (steps) of batches."""
    losses = [w.train(theta_q, m, b, loss_fn) for w, m, b in zip(workers, masks, batches)]
    models = [{k: v.detach().clone() for k, v in w.params.items()} for w in workers]
    new, coverage = oracle_aggregate(theta_q, models, masks, uncovered)
    return new, coverage, losses
