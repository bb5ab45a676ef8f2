"""Inception-v3 from a local weights file: plumbing with random weights (nothing is ever
downloaded), the TF graph's pooling branches, and clear messages for absent or foreign files."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

from fedscore.errors import FedscoreError
from fedscore.metrics.inception_net import (
    FEATURES,
    _tf_pool_blocks,
    build_inception,
    load_inception,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random state dict in the layout of pytorch-fid's pt_inception-2015-12-05 file:
    plain torchvision Inception3, 1008 classes, no auxiliary head.

    init_weights=True (torchvision's truncated-normal init, std 0.1): with PyTorch's default
    init the ~50 conv + BatchNorm layers shrink the input's signal until pool3 is the same
    vector for every image up to ~1e-7 relative (kernel rounding then decides whether two
    images' features compare equal); this init keeps a ~10% difference between images (its
    activations grow to ~1e13, so tolerances below are relative to the values' scale)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=True)
        for m in net.modules():  # non-trivial BatchNorm statistics, so a wrong load shows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    folder = tmp_path_factory.mktemp("inception")
    torch.save(state, folder / "pt_inception.pth")
    return folder / "pt_inception.pth", state


@pytest.fixture(scope="module")
def grey():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 8, 8, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def read_out(weights, grey):
    net = load_inception(weights[0], device="cpu")
    return net, *net.features_and_logits(grey)


def test_the_tf_blocks_keep_torchvisions_parameter_layout():
    plain = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours = build_inception(1008)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()}


def test_random_weights_give_pool3_features_and_1008_logits(read_out, grey):
    net, feats, logits = read_out
    assert feats.shape == (2, FEATURES) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs
    # different images, different features: by far more than rounding (measured ~0.13 of
    # the features' norm; kernel differences between machines are ~1e-6 of it)
    scale = feats.norm(dim=1).mean()
    assert scale > 0 and (feats[0] - feats[1]).norm() > 0.01 * scale
    # the logits are the fc layer of the file applied to pool3
    expect = F.linear(feats, net.fc.weight.double(), net.fc.bias.double())
    # float32 products summed over 2048 features: an error relative to the logits' scale
    torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()))
    stats = net.stats(grey)
    assert stats.n == 2 and stats.dim == FEATURES
    torch.testing.assert_close(stats.sum, feats.sum(0))


def test_a_safetensors_copy_without_step_counters_loads_to_the_same_network(
    weights, read_out, grey, tmp_path
):
    from safetensors.torch import save_file

    _, state = weights
    slim = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    slim["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # torchvision's auxiliary head: ignored
    save_file(slim, tmp_path / "inception.safetensors")
    net = load_inception(tmp_path / "inception.safetensors", device="cpu")
    for name, value in net.net.state_dict().items():  # the trunk; fc is kept apart
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(value, state[name]), name
    torch.testing.assert_close(net.fc.weight, state["fc.weight"])
    # grey images read as RGB images with three equal channels
    _, feats, _ = read_out
    rgb_feats = net.features(grey.expand(-1, 3, -1, -1).clone())
    torch.testing.assert_close(rgb_feats, feats)


@pytest.mark.parametrize("block", ["A", "C", "E", "E-max"])
def test_tf_pooling_branches_differ_from_torchvision_only_at_the_border(block):
    # On a constant input TF's pooling (average over real pixels only, or max) returns the
    # constant everywhere, so the pooling branch equals branch_pool(x); torchvision's
    # average counts the zero padding and is smaller on the border.
    a, c, e, e_max = _tf_pool_blocks()
    make = {"A": (a, tv.InceptionA, (8, 4)), "C": (c, tv.InceptionC, (8, 4)),
            "E": (e, tv.InceptionE, (8,)), "E-max": (e_max, tv.InceptionE, (8,))}[block]
    ours_cls, plain_cls, args = make
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = plain_cls(*args).eval()
    ours = ours_cls(*args).eval()
    ours.load_state_dict(plain.state_dict())
    x = torch.full((1, 8, 5, 5), 0.7)
    with torch.no_grad():
        want = ours.branch_pool(x)
        got = ours(x)[:, -want.shape[1]:]
        theirs = plain(x)[:, -want.shape[1]:]
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(theirs[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])
        assert not torch.allclose(theirs[..., 0, 0], want[..., 0, 0])
        # the other branches are torchvision's own
        torch.testing.assert_close(ours(x)[:, : -want.shape[1]], plain(x)[:, : -want.shape[1]])


def test_a_missing_file_says_that_nothing_is_downloaded(tmp_path):
    with pytest.raises(FedscoreError, match="does not exist. Nothing is downloaded.*pt_inception"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_foreign_files_name_the_expected_format(weights, tmp_path):
    _, state = weights
    renamed = {f"backbone.{k}": v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(FedscoreError, match="fc.weight.*expected a state dict of torchvision"):
        load_inception(tmp_path / "renamed.pth", device="cpu")

    extra = dict(state, **{"head.weight": torch.zeros(3)})
    del extra["Mixed_7c.branch_pool.conv.weight"]
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(FedscoreError, match=r"missing: Mixed_7c.branch_pool.conv.weight; "
                                            r"unexpected: head.weight"):
        load_inception(tmp_path / "extra.pth", device="cpu")

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not weights
    with pytest.raises(FedscoreError, match="weights-only torch state dict"):
        load_inception(tmp_path / "module.pth", device="cpu")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(FedscoreError, match="does not hold a state dict"):
        load_inception(tmp_path / "list.pth", device="cpu")

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FedscoreError, match="cannot read .* as safetensors"):
        load_inception(tmp_path / "bad.safetensors", device="cpu")


def test_images_of_the_wrong_shape_are_refused(read_out):
    net = read_out[0]
    with pytest.raises(FedscoreError, match="1 or 3"):
        net.features(torch.zeros(2, 2, 8, 8))
    with pytest.raises(FedscoreError, match="NaN"):
        net.features(torch.full((1, 1, 8, 8), float("nan")))
