"""The user's own images (issue 18): image folders and .npz arrays read into the loaders'
contract (float32 (N, C, H, W) in [-1, 1], int64 labels), with their options, held-out
rules and one clear error for every bad input. All data are generated here."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fedscore import data
from fedscore.config import DataConfig, load_config
from fedscore.data import own
from fedscore.errors import FedscoreError


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root, classes=("cat", "dog"), n=10, size=16, rgb=False, seed=0):
    """root/<class>/<i>.png: class c's pixels are drawn around a class-specific level."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    for c, name in enumerate(classes):
        for i in range(n):
            level = 20 + 60 * c
            write_png(root / name / f"{i:02d}.png",
                      rng.integers(level, level + 40, shape, dtype=np.uint8))
    return root


def source(**kw):
    return DataConfig(**kw)


def snapshot(folder):
    return sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))


# ---------------------------------------------------------------- folders


@pytest.mark.parametrize(("size", "rgb"), [(16, False), (32, True)])
def test_a_folder_of_two_classes_reads_as_labelled_images_in_minus_one_one(tmp_path, size, rgb):
    root = make_folder(tmp_path / "imgs", size=size, rgb=rgb)
    d = source(name="folder", path=str(root))
    x, y = data.load(d, "all")
    c = 3 if rgb else 1
    assert x.shape == (20, c, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and sorted(y.tolist()) == [0] * 10 + [1] * 10
    # pixel p -> p / 127.5 - 1 exactly, image by image
    raw = np.asarray(Image.open(root / "dog" / "03.png"), dtype=np.float32)
    raw = raw[None] if raw.ndim == 2 else raw.transpose(2, 0, 1)
    xs = [x[i] for i in range(20) if y[i] == 1]
    assert any(torch.allclose(xi, torch.from_numpy(raw / 127.5 - 1)) for xi in xs)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    info = data.info(d)
    assert info.shape == (c, size, size) and info.classes == 2
    assert info.n == {"train": 16, "test": 4}


def test_images_directly_in_the_folder_are_one_unlabelled_class(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(6):
        write_png(tmp_path / "u" / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    (tmp_path / "u" / ".DS_Store").write_bytes(b"not an image")  # hidden: skipped
    d = source(name="folder", path=str(tmp_path / "u"))
    x, y = data.load(d, "all")
    assert x.shape == (6, 1, 8, 8) and (y == 0).all()
    assert data.info(d).classes == 1
    assert data.groups(d, "train") is None


def test_label_numbering_classes_list_then_integer_names_then_sorted_names(tmp_path):
    make_folder(tmp_path / "named", classes=("zebra", "ant"), n=3)
    sorted_names = source(name="folder", path=str(tmp_path / "named"), test_fraction=0.01)
    assert data.load(sorted_names, "train")[1].tolist() == [0, 0, 0, 1, 1, 1]  # ant, zebra
    listed = source(name="folder", path=str(tmp_path / "named"), test_fraction=0.01,
                    classes=["zebra", "ant", "bee"])
    _, y = data.load(listed, "train")
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.info(listed).classes == 3  # the list names the label space
    make_folder(tmp_path / "ints", classes=("0", "3"), n=3)
    ints = source(name="folder", path=str(tmp_path / "ints"), test_fraction=0.01)
    assert sorted(data.load(ints, "train")[1].tolist()) == [0, 0, 0, 3, 3, 3]
    assert data.info(ints).classes == 4


def test_jpeg_and_bmp_are_read_like_png(tmp_path):
    ramp = np.arange(8, dtype=np.uint8) * 30  # smooth, so the jpeg's loss stays small
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 100), -1)
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    Image.fromarray(pixels).save(tmp_path / "b.jpg", quality=95)
    x, _ = data.load(source(name="folder", path=str(tmp_path)), "all")
    assert x.shape == (2, 3, 8, 8)
    want = torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1).float()
    errors = sorted(float((xi - want).abs().max()) for xi in x)
    assert errors[0] < 1e-6  # the lossless bmp exactly
    assert errors[1] < 0.2  # the jpeg within its loss


def test_image_size_crops_the_centre_square_and_block_averages_when_it_divides(tmp_path):
    pixels = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12) * 2
    write_png(tmp_path / "f" / "a.png", pixels)
    d = source(name="folder", path=str(tmp_path / "f"), image_size=4)
    x, _ = data.load(d, "all")
    square = torch.from_numpy(pixels[:, 2:10].astype(np.float32) / 127.5 - 1)  # centre 8x8
    want = square.reshape(4, 2, 4, 2).mean((1, 3))
    assert x.shape == (1, 1, 4, 4)
    torch.testing.assert_close(x[0, 0], want, atol=1e-6, rtol=0)
    # a size that does not divide: antialiased bilinear, still within the pixels' range
    y5, _ = data.load(source(name="folder", path=str(tmp_path / "f"), image_size=5), "all")
    assert y5.shape == (1, 1, 5, 5)
    assert square.min() - 1e-6 <= y5.min() and y5.max() <= square.max() + 1e-6


def test_mixed_sizes_are_made_one_by_image_size(tmp_path):
    rng = np.random.default_rng(3)
    write_png(tmp_path / "m" / "a" / "1.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    write_png(tmp_path / "m" / "b" / "2.png", rng.integers(0, 255, (32, 24, 3), dtype=np.uint8))
    d = source(name="folder", path=str(tmp_path / "m"), image_size=8, test_fraction=0.01)
    x, y = data.load(d, "train")
    assert x.shape == (2, 3, 8, 8)  # one colour image: all RGB
    grey = data.load(d.model_copy(update={"channels": 1}), "train")[0]
    assert grey.shape == (2, 1, 8, 8)


def test_channels_convert_grey_to_rgb_and_rgb_to_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_png(tmp_path / "c" / "a.png", rgb)
    x1, _ = data.load(source(name="folder", path=str(tmp_path / "c"), channels=1), "all")
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    assert abs(float(x1.mean()) - (luma / 127.5 - 1)) < 1e-5
    write_png(tmp_path / "g" / "a.png", np.full((4, 4), 51, dtype=np.uint8))
    x3, _ = data.load(source(name="folder", path=str(tmp_path / "g"), channels=3), "all")
    assert x3.shape == (1, 3, 4, 4) and torch.allclose(x3, torch.full_like(x3, 51 / 127.5 - 1))


def test_hflip_appends_each_training_images_mirror_and_leaves_test_alone(tmp_path):
    root = make_folder(tmp_path / "f", n=5, size=8)
    plain = source(name="folder", path=str(root))
    flip = source(name="folder", path=str(root), hflip=True)
    x, y = data.load(plain, "train")
    xf, yf = data.load(flip, "train")
    assert torch.equal(xf, torch.cat([x, x.flip(-1)])) and torch.equal(yf, torch.cat([y, y]))
    assert torch.equal(data.load(flip, "test")[0], data.load(plain, "test")[0])
    assert data.info(flip).n["train"] == len(yf)


def test_test_fraction_is_a_disjoint_stratified_split_stable_by_seed(tmp_path):
    root = make_folder(tmp_path / "f", n=20, size=4, classes=("a", "b", "c"))
    d = source(name="folder", path=str(root), test_fraction=0.25, split_seed=7)
    x_tr, y_tr = data.load(d, "train")
    x_te, y_te = data.load(d, "test")
    assert torch.bincount(y_te).tolist() == [5, 5, 5]  # round(0.25 * 20) per class
    assert torch.bincount(y_tr).tolist() == [15, 15, 15]
    rows = {tuple(r) for r in x_tr.flatten(1).tolist()}
    assert not rows & {tuple(r) for r in x_te.flatten(1).tolist()}  # disjoint
    own.clear_cache()  # decoded afresh: the same split
    assert torch.equal(data.load(d, "test")[0], x_te)
    other = data.load(d.model_copy(update={"split_seed": 8}), "test")[0]
    assert not torch.equal(other, x_te)
    x_all, _ = data.load(d, "all")
    assert torch.equal(x_all, torch.cat([x_tr, x_te]))


def test_test_path_is_the_held_out_split_numbered_like_the_training_folder(tmp_path):
    make_folder(tmp_path / "train", classes=("cat", "dog"), n=4, size=8)
    make_folder(tmp_path / "test", classes=("dog",), n=2, size=8, seed=5)
    d = source(name="folder", path=str(tmp_path / "train"), test_path=str(tmp_path / "test"))
    assert len(data.load(d, "train")[1]) == 8  # all of path
    _, y_te = data.load(d, "test")
    assert y_te.tolist() == [1, 1]  # "dog" is label 1, as in the training folder
    assert data.info(d).n == {"train": 8, "test": 2}
    make_folder(tmp_path / "stray", classes=("emu",), n=1, size=8)
    bad = d.model_copy(update={"test_path": str(tmp_path / "stray")})
    with pytest.raises(FedscoreError, match="'emu'.*data.classes"):
        data.load(bad, "test")


def test_info_lists_without_decoding_when_image_size_and_channels_are_set(tmp_path):
    root = make_folder(tmp_path / "f", n=5, size=8)
    (root / "cat" / "00.png").write_bytes(b"\x89PNG broken")  # decoding would fail
    d = source(name="folder", path=str(root), image_size=4, channels=3)
    info = data.info(d)
    assert info.shape == (3, 4, 4) and info.classes == 2 and sum(info.n.values()) == 10
    with pytest.raises(FedscoreError, match="00.png"):
        data.load(d, "train")


def test_decoded_images_are_cached_and_reread_when_a_file_changes(tmp_path):
    root = make_folder(tmp_path / "f", n=3, size=4)
    d = source(name="folder", path=str(root), test_fraction=0.01)
    own.clear_cache()
    data.load(d, "train")
    data.info(d)  # needs the images' size: from the cache
    assert own._decode_folder.cache_info().misses == 1  # one decode for load and info
    x, _ = data.load(d, "train")
    x.fill_(7.0)  # the caller's copy, not the cache
    assert float(data.load(d, "train")[0].max()) <= 1
    write_png(root / "cat" / "00.png", np.zeros((4, 4), dtype=np.uint8))
    os.utime(root / "cat" / "00.png", ns=(1, 1))  # another time: another key
    assert float(data.load(d, "train")[0].min()) == -1.0
    assert own._decode_folder.cache_info().misses == 2


# ---------------------------------------------------------------- .npz arrays


def npz(tmp_path, name="a.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", ["uint8", "float01", "float11"])
def test_arrays_in_every_layout_and_dtype_read_alike(tmp_path, layout, dtype):
    rng = np.random.default_rng(4)
    c = 1 if layout == "NHW" else 3
    base = rng.integers(0, 256, (6, c, 8, 8), dtype=np.uint8)  # (N, C, H, W)
    x = {"NHW": base[:, 0], "NHWC": base.transpose(0, 2, 3, 1), "NCHW": base}[layout]
    x = {"uint8": x, "float01": x / 255.0, "float11": x / 127.5 - 1}[dtype]
    path = npz(tmp_path, x=x, y=np.arange(6) % 2)
    d = source(name="arrays", path=str(path))
    got, y = data.load(d, "all")  # train then test: the same images, reordered
    assert got.shape == (6, c, 8, 8) and got.dtype == torch.float32
    order = np.concatenate([data.sources.split_indices(np.arange(6) % 2, s, seed=d.split_seed)
                            for s in ("train", "test")])
    want = torch.from_numpy(base[order] / 127.5 - 1).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert y.dtype == torch.int64 and y.tolist() == (np.arange(6) % 2)[order].tolist()


def test_arrays_options_labels_and_groups(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    path = npz(tmp_path, x=x, y=np.arange(24) % 3, group=np.array(["b", "a"] * 12))
    d = source(name="arrays", path=str(path), image_size=8, channels=1, test_fraction=0.25)
    xs, ys = data.load(d, "train")
    # held out per (silo, class): 6 strata of 4 images, one of each to the test split
    assert xs.shape == (18, 1, 8, 8) and torch.bincount(ys).tolist() == [6, 6, 6]
    g = data.groups(d, "train")
    assert g.shape == (18,) and np.bincount(g).tolist() == [9, 9]  # "a" -> 0, "b" -> 1
    info = data.info(d)
    assert info.shape == (1, 8, 8) and info.classes == 3 and info.n == {"train": 18, "test": 6}
    unlabelled = npz(tmp_path, "u.npz", x=x)
    assert data.info(source(name="arrays", path=str(unlabelled))).classes == 1


def test_an_ambiguous_or_unknown_layout_is_named(tmp_path):
    amb = npz(tmp_path, "amb.npz", x=np.zeros((2, 3, 3, 3), np.uint8))
    with pytest.raises(FedscoreError, match=r"both as \(N, H, W, C\) and as \(N, C, H, W\)"):
        data.load(source(name="arrays", path=str(amb)), "all")
    odd = npz(tmp_path, "odd.npz", x=np.zeros((2, 5, 8, 8), np.uint8))
    with pytest.raises(FedscoreError, match=r"C = 1 \(grey\) or 3"):
        data.load(source(name="arrays", path=str(odd)), "all")
    wide = npz(tmp_path, "wide.npz", x=np.full((4, 8, 8), 3.0))
    with pytest.raises(FedscoreError, match=r"\[0, 1\] or \[-1, 1\]"):
        data.load(source(name="arrays", path=str(wide)), "all")


# ---------------------------------------------------------------- the combinations


def test_config_combinations_are_one_clear_error_each():
    with pytest.raises(FedscoreError, match="data.path is for your own data"):
        load_config(data={"name": "mnist5k", "path": "/x"})
    with pytest.raises(FedscoreError, match="mnist5k:14x14"):
        load_config(data={"name": "mnist5k", "image_size": 14})
    with pytest.raises(FedscoreError, match="data.hflip"):
        load_config(data={"name": "digits", "hflip": True})
    with pytest.raises(FedscoreError, match="data.image_size"):
        load_config(data={"name": "folder:32x32"})
    no_path = load_config(data={"name": "folder"})  # a server's config: nodes hold the data
    with pytest.raises(FedscoreError, match="set data.path"):
        data.load(no_path.data, "train")
    with pytest.raises(FedscoreError, match="data config"):
        data.info("folder")


def test_a_builtin_dataset_reads_the_same_by_name_or_by_config():
    x, y = data.load("digits", "test")
    x2, y2 = data.load(DataConfig(name="digits"), "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert data.info(DataConfig(name="digits")) == data.info("digits")
    assert data.groups(DataConfig(name="digits")) is None


# ---------------------------------------------------------------- bad input: one error, no file


def bad_inputs(tmp_path):
    """(DataConfig, message pattern) for each bad input of issue 18."""
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = tmp_path / "mixed"
    write_png(mixed / "a.png", np.zeros((16, 16), np.uint8))
    write_png(mixed / "b.png", np.zeros((32, 32), np.uint8))
    corrupt = tmp_path / "corrupt"
    write_png(corrupt / "ok.png", np.zeros((8, 8), np.uint8))
    good = (corrupt / "ok.png").read_bytes()
    (corrupt / "bad.png").write_bytes(good[: len(good) // 2])  # truncated
    text = tmp_path / "text"
    write_png(text / "ok.png", np.zeros((8, 8), np.uint8))
    (text / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 8, 8), np.uint8), y=np.zeros(2, int))
    empty_class = tmp_path / "emptyclass"
    write_png(empty_class / "a" / "1.png", np.zeros((8, 8), np.uint8))
    (empty_class / "b").mkdir()
    return [
        (source(name="folder", path=str(empty)), "is empty"),
        (source(name="folder", path=str(mixed)),
         r"'.*a.png' is 16x16 and '.*b.png' is 32x32.*data.image_size"),
        (source(name="folder", path=str(corrupt)), r"bad.png' is not an image"),
        (source(name="folder", path=str(text)), r"notes.txt' is not an image"),
        (source(name="arrays", path=str(tmp_path / "nox.npz")),
         r"no array 'x'.*'images', 'y'"),
        (source(name="folder", path=str(empty_class)), r"b' is empty"),
        (source(name="folder", path=str(tmp_path / "missing")), "does not exist"),
        (source(name="arrays", path=str(text / "notes.txt")), "not a readable .npz"),
    ]


def test_every_bad_input_is_one_fedscore_error_and_writes_nothing(tmp_path):
    cases = bad_inputs(tmp_path)
    before = snapshot(tmp_path)
    for d, pattern in cases:
        with pytest.raises(FedscoreError, match=pattern):
            data.load(d, "train")
    assert snapshot(tmp_path) == before
