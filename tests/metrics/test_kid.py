"""KID: unbiased polynomial-kernel MMD^2 over subsets."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.metrics import kid
from fedscore.metrics.kid import mmd2_unbiased


def test_unbiased_mmd_matches_a_hand_computed_tiny_case():
    # kernel matrices chosen by hand: xx off-diagonal mean 0.5, yy 0.25, xy mean 0.25
    kxx = torch.tensor([[9.0, 0.5], [0.5, 9.0]])
    kyy = torch.tensor([[7.0, 0.2, 0.3], [0.2, 7.0, 0.25], [0.3, 0.25, 7.0]])
    kxy = torch.full((2, 3), 0.25)
    assert float(mmd2_unbiased(kxx, kyy, kxy)) == pytest.approx(0.5 + 0.25 - 0.5)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g)
    y = torch.randn(1000, 8, generator=g)
    same, same_std = kid(x, y, subsets=20, subset_size=500, generator=g)
    near, _ = kid(x, y + 0.3, subsets=20, subset_size=500, generator=g)
    far, _ = kid(x, y + 1.0, subsets=20, subset_size=500, generator=g)
    assert abs(same) < 3 * same_std + 1e-3
    assert same < near < far


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_equals_torchmetrics_on_full_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.num_features = k

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 6, generator=g, dtype=torch.float64)
    fake = 1.2 * torch.randn(150, 6, generator=g, dtype=torch.float64) + 0.2
    # one subset of 150 out of 150 fakes: the fake subset is all of them; MMD is
    # permutation-free, so only the real subset's draw differs — make it the full set too.
    real = real[:150]
    metric = KernelInceptionDistance(feature=Identity(6), subsets=1, subset_size=150)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs, _ = metric.compute()
    ours, std = kid(real, fake, subsets=1, subset_size=150)
    assert ours == pytest.approx(float(theirs), rel=1e-8)
    assert std == 0.0


def test_kid_rejects_bad_input():
    with pytest.raises(FedscoreError, match="same dimension"):
        kid(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(FedscoreError, match="at least 2"):
        kid(torch.zeros(1, 2), torch.zeros(5, 2))
