"""Precision/recall with k-NN manifolds (Kynkäänniemi et al. 2019), density/coverage."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.metrics import density_coverage, precision_recall
from fedscore.metrics.prdc import knn_radii


def test_precision_and_recall_of_a_hand_computed_line():
    # real 0, 1, 3 with k=1: radii 1, 1, 2. fake 0.5 (inside the ball of 0), 10 (outside):
    # precision 1/2. fake radii (k=1): 9.5 each, so every real point is covered: recall 1.
    real = torch.tensor([[0.0], [1.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert knn_radii(real.double(), 1).tolist() == [1.0, 1.0, 2.0]
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0, 0.0], [6.0, 0.0]])
    real = centres[torch.arange(2000) % 2] + torch.randn(2000, 2, generator=g)
    fake = centres[1] + torch.randn(1000, 2, generator=g)  # one of the two modes only
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95
    assert 0.35 < recall < 0.6
    # same law: both high; far away: both zero
    same = centres[torch.arange(1000) % 2] + torch.randn(1000, 2, generator=g)
    p_same, r_same = precision_recall(real, same)
    assert p_same > 0.95 and r_same > 0.95
    assert precision_recall(real, fake + 100.0) == (0.0, 0.0)


def test_density_and_coverage_of_the_same_law_are_near_one():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(1500, 3, generator=g)
    fake = torch.randn(1500, 3, generator=g)
    density, coverage = density_coverage(real, fake, k=5)
    assert 0.85 < density < 1.15 and coverage > 0.9
    d_shift, c_shift = density_coverage(real, fake + 2.0, k=5)
    assert d_shift < 0.5 * density and c_shift < 0.5 * coverage


def test_precision_recall_rejects_bad_input():
    with pytest.raises(FedscoreError, match="more than k"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)
    with pytest.raises(FedscoreError, match="positive integer"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 2), k=0)
