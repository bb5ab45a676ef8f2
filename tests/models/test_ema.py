"""EMA of weights: the exponential average by hand, pure and in place alike, warm-up."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.models import ema_decay, ema_init, ema_update, ema_update_


def test_ema_update_is_the_exponential_average_by_hand():
    ema = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)}
    params = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(0.0)}
    out = ema_update(ema, params, decay=0.75)
    # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 2 + 0.25 * 6 = 3; 0.75 * 4 = 3
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(out["b"], torch.tensor(3.0))
    torch.testing.assert_close(ema["w"], torch.tensor([1.0, 2.0]))  # input untouched


def test_repeated_updates_follow_the_closed_form():
    # constant params p from e0: e_n = p + decay^n (e0 - p)
    e0, p, d = torch.tensor([10.0]), torch.tensor([2.0]), 0.9
    ema = {"w": e0.clone()}
    for _ in range(5):
        ema = ema_update(ema, {"w": p}, d)
    torch.testing.assert_close(ema["w"], p + d**5 * (e0 - p))


def test_in_place_update_equals_the_pure_one_and_leaves_no_graph():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    ema = {k: v + 1.0 for k, v in ema_init(params).items()}
    pure = ema_update(ema, params, 0.99)
    ema_update_(ema, params, 0.99)
    for k in params:
        torch.testing.assert_close(ema[k], pure[k])
        assert not ema[k].requires_grad and not pure[k].requires_grad


def test_stacked_worker_params_update_elementwise_and_integers_are_copied():
    ema = {"w": torch.zeros(3, 2), "n": torch.tensor([1, 1, 1])}
    params = {"w": torch.arange(6.0).reshape(3, 2), "n": torch.tensor([5, 6, 7])}
    out = ema_update(ema, params, 0.5)
    torch.testing.assert_close(out["w"], torch.arange(6.0).reshape(3, 2) / 2)
    assert out["n"].tolist() == [5, 6, 7]


def test_warm_up_rule():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_bad_ema_inputs_are_clear_errors():
    with pytest.raises(FedscoreError, match=r"ema_decay must be in \[0, 1\]"):
        ema_update({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 1.5)
    with pytest.raises(FedscoreError, match="another model"):
        ema_update({"v": torch.zeros(1)}, {"w": torch.zeros(1)}, 0.5)
