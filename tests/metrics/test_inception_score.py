"""Inception Score from logits, and the classifier read-outs of the FI paper."""

import math

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.metrics import class_accuracy, inception_score, unrecognisable_fraction


def _confident_logits(labels, classes, margin=200.0):
    return margin * torch.nn.functional.one_hot(labels, classes).double()


@pytest.mark.parametrize("classes", [2, 10, 37])
def test_confident_balanced_output_scores_the_number_of_classes(classes):
    labels = torch.arange(classes * 20) % classes  # every split of 10 holds each class twice
    logits = _confident_logits(labels, classes)
    mean, std = inception_score(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(classes, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # one split is order-free: the whole set is balanced, whatever the shuffle
    assert inception_score(logits, splits=1)[0] == pytest.approx(classes, rel=1e-9)


def test_default_shuffle_protects_class_sorted_sets():
    # a set generated digit by digit: consecutive chunks each hold one class and score 1
    labels = torch.arange(10).repeat_interleave(100)
    logits = _confident_logits(labels, 10)
    assert inception_score(logits, splits=10, shuffle=False)[0] == pytest.approx(1.0)
    assert inception_score(logits, splits=10)[0] > 9.0


def test_constant_output_scores_one():
    logits = torch.tensor([[0.3, 2.0, -1.0]]).repeat(500, 1)
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_but_unbalanced_output_scores_exp_of_the_label_entropy():
    # KL(p(y|x) || p(y)) = -log p(y_x) for one-hot p(y|x): IS = exp(H(labels)).
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    mean, _ = inception_score(_confident_logits(labels, 3), splits=1)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert mean == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save")
def test_inception_score_equals_torchmetrics_with_logits_as_features():
    from torchmetrics.image.inception import InceptionScore

    class Logits(torch.nn.Module):
        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1000, 10, generator=g, dtype=torch.float64)
    metric = InceptionScore(feature=Logits(), splits=10, normalize=False)
    metric.update(logits)
    # torchmetrics shuffles with the global RNG: fork it, and apply the same permutation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        t_mean, t_std = metric.compute()
        torch.manual_seed(7)
        perm = torch.randperm(1000)
    mean, std = inception_score(logits[perm], splits=10, shuffle=False)
    assert mean == pytest.approx(float(t_mean), rel=1e-10)
    # torchmetrics reports the sample std (ddof=1); we report the papers' np.std (ddof=0)
    assert std == pytest.approx(float(t_std) * math.sqrt(9 / 10), rel=1e-8)


def test_shuffling_is_reproducible_and_splits_one_is_order_free():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 4, generator=g)
    assert inception_score(logits, splits=4) == inception_score(logits, splits=4)
    a = inception_score(logits, splits=4, generator=torch.Generator().manual_seed(3))
    b = inception_score(logits, splits=4, generator=torch.Generator().manual_seed(3))
    assert a == b
    one = inception_score(logits, splits=1, generator=torch.Generator().manual_seed(3))
    assert one[0] == pytest.approx(inception_score(logits, splits=1, shuffle=False)[0], rel=1e-12)


@pytest.mark.parametrize(
    "logits, splits, match",
    [
        (torch.zeros(10), 1, "shape"),
        (torch.zeros(5, 3), 10, "at least splits=10"),
        (torch.zeros(5, 3), 0, "positive integer"),
    ],
)
def test_inception_score_rejects_bad_input(logits, splits, match):
    with pytest.raises(FedscoreError, match=match):
        inception_score(logits, splits=splits)


def test_class_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.5)
    with pytest.raises(FedscoreError, match="labels must have shape"):
        class_accuracy(logits, torch.tensor([0, 1]))
    with pytest.raises(FedscoreError, match="integers in"):
        class_accuracy(logits, torch.tensor([0, 1, 2, 0]))


def test_unrecognisable_fraction_counts_low_top_probability():
    # softmax tops: e^2/(e^2+2) = 0.79 | 1/3 | 0.5 (two classes tie: not below 0.5) | ~1
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, -1e4], [9.0, 0.0, 0.0]])
    assert unrecognisable_fraction(logits) == pytest.approx(0.25)
    assert unrecognisable_fraction(logits, threshold=0.8) == pytest.approx(0.75)
    with pytest.raises(FedscoreError, match="threshold"):
        unrecognisable_fraction(logits, threshold=1.5)
