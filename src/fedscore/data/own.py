"""The user's own images (issue 18): an image folder or an .npz array file.

`data: {name: folder, path: DIR}`
  - DIR/<class>/<image>: one subfolder per class gives the labels; DIR/<image>: images
    directly in DIR give an unconditional dataset (labels all 0, one class);
  - DIR/<silo>/<class>/<image>: a level of silos above the classes, what partition scheme
    "natural" splits by (with one level, the top folders are the silos);
  - labels: `data.classes` (folder names in label order) if set; else integer folder names
    are their labels; else the sorted names are numbered 0, 1, ...;
  - any format PIL reads (png, jpg, bmp, ...); hidden files (".name") are skipped; any other
    file that is not a readable image is an error naming it.
`data: {name: arrays, path: FILE.npz}`
  - `x`: (N, H, W), (N, H, W, C) or (N, C, H, W), C 1 or 3 (told apart by which axis is 1
    or 3), uint8 0..255 or float in [0, 1] (if min >= 0) or [-1, 1]; `y` (N,) integer labels
    (optional: without it, one class); `group` (N,) silo of each image (optional: the silos
    of scheme "natural", sorted by value). Never unpickled (allow_pickle=False).

Options (DataConfig): `image_size` (centre square crop, then resize to image_size^2: exact
block means when the size divides the square, else antialiased bilinear), `channels`
(grey <-> RGB: ITU-R 601 luma like PIL's "L", or the grey value repeated), `hflip` (the
training split gains every image's mirror image: flip augmentation, stored, so every
party and every round sees the same data), and the held-out rule: `test_path` (same format)
else a stratified `test_fraction` drawn by `split_seed` (sources.split_indices, the bundled
datasets' rule with its seed and fraction as parameters; per class, and with silos per
(silo, class), so every silo keeps its share of each of its classes). `split="all"` is
train then test.

Output like every loader: float32 (N, C, H, W) in [-1, 1] and int64 labels (N,). The decoded
arrays are cached in-process (the engine, its held-out batch and the evaluation read the
same data several times), keyed by the files' names, sizes and modification times and the
options, so an edited folder is read afresh. Every bad input is one FedscoreError that names
the file or folder and what to do; nothing is written anywhere.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedscore.data.sources import DatasetInfo, split_indices
from fedscore.errors import FedscoreError

GREY_MODES = {"1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N"}
"""PIL modes read as one channel (16-bit grey is scaled to 8 bits); every other mode is
converted to RGB (palette, RGBA, CMYK, ...: alpha dropped)."""
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses
CACHE_SIZE = 8  # decoded sources kept per process (train and test files of a few runs)


@dataclass(frozen=True)
class Listing:
    """What an own-data source holds, read without decoding a pixel."""

    labels: np.ndarray
    """(N,) int64 labels in the order the images are decoded."""
    groups: np.ndarray | None
    """(N,) int64 silo ids (sorted silo names -> 0..K-1), or None."""
    classes: int
    files: tuple[Path, ...] = ()
    """Folder data: the image files, in label order; empty for .npz."""
    stamp: tuple = ()
    """(name, size, mtime) of every file read: the decoded cache's key."""


# ---------------------------------------------------------------- the source and its options


def _path(d, key: str = "path") -> Path:
    value = getattr(d, key)
    if value is None:
        raise FedscoreError(
            f"data.name {d.name!r} reads your own data from data.path: set data.path to "
            + ("the image folder" if d.name == "folder" else "the .npz file")
            + " (a SuperNode gives it as `data-path` in its node config)")
    p = Path(value).expanduser()
    if not p.exists():
        raise FedscoreError(f"data.{key} {str(p)!r} does not exist")
    if d.name == "folder" and not p.is_dir():
        raise FedscoreError(f"data.{key} {str(p)!r} is not a folder; for an .npz file set "
                            "data.name: arrays")
    if d.name == "arrays" and not p.is_file():
        raise FedscoreError(f"data.{key} {str(p)!r} is not a file; for an image folder set "
                            "data.name: folder")
    return p


def _options(d) -> tuple:
    classes = tuple(d.classes) if d.classes is not None else None
    return (d.image_size, d.channels, classes)


# ---------------------------------------------------------------- folders: listing


def _visible(folder: Path) -> list[Path]:
    """A folder's entries without hidden ones (".DS_Store", ".git"), sorted by name."""
    try:
        return sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                      key=lambda p: p.name)
    except OSError as err:
        raise FedscoreError(f"cannot read the folder {str(folder)!r}: {err}") from None


def _stamp(files) -> tuple:
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _images_in(folder: Path, root: Path) -> list[Path]:
    """The files of a leaf folder (a class or an unconditional folder); a subfolder or an
    empty folder is an error naming it."""
    entries = _visible(folder)
    if not entries:
        raise FedscoreError(f"the folder {str(folder)!r} is empty: put its images in it or "
                            f"remove it")
    deeper = [e for e in entries if e.is_dir()]
    if deeper:
        raise FedscoreError(
            f"{str(deeper[0])!r} is one folder level too deep: {str(root)!r} holds either "
            "images, or one subfolder per class, or one subfolder per silo holding one "
            "subfolder per class")
    return entries


def numbering(names: list[str], classes: tuple[str, ...] | None, where: Path
              ) -> dict[str, int]:
    """Class folder name -> label: `data.classes` order when given; else integer names are
    their labels; else the sorted names numbered 0, 1, ..."""
    if classes is not None:
        if len(set(classes)) != len(classes):
            raise FedscoreError(f"data.classes {list(classes)} names a class twice")
        stray = [n for n in names if n not in classes]
        if stray:
            raise FedscoreError(
                f"the class folder {stray[0]!r} in {str(where)!r} is not one of data.classes "
                f"{list(classes)}: add it to data.classes or remove the folder")
        return {n: classes.index(n) for n in names}
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def list_folder(root: Path, classes: tuple[str, ...] | None,
                reference: dict[str, int] | None = None) -> tuple[Listing, dict[str, int]]:
    """The folder's images and labels (and silos), no pixel read; and its name -> label
    numbering. reference: the training folder's numbering, which a test folder must use
    (its names, if not integers or data.classes, must be among the training folder's)."""
    entries = _visible(root)
    if not entries:
        raise FedscoreError(
            f"the image folder {str(root)!r} is empty: put images in it (unconditional) or "
            "one subfolder of images per class")
    dirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    if dirs and files:
        raise FedscoreError(
            f"the image folder {str(root)!r} mixes files ({files[0].name!r}) and subfolders "
            f"({dirs[0].name!r}): put the images either directly in it (unconditional) or "
            "in one subfolder per class")
    if files:  # images directly in DIR: unconditional, one class
        return Listing(np.zeros(len(files), np.int64), None, 1, tuple(files),
                       _stamp(files)), {}
    two_level = [any(e.is_dir() for e in _visible(d)) for d in dirs]
    if any(two_level) and not all(two_level):
        flat = dirs[two_level.index(False)]
        nested = dirs[two_level.index(True)]
        raise FedscoreError(
            f"the image folder {str(root)!r} mixes class folders of images ({flat.name!r}) "
            f"and silo folders of class folders ({nested.name!r}); use one layout: "
            "DIR/<class>/<image> or DIR/<silo>/<class>/<image>")
    # (silo index, class folder) pairs; with one level the class folders are the silos
    leaves = ([(s, c) for s, silo in enumerate(dirs) for c in _visible(silo)]
              if two_level[0] else list(enumerate(dirs)))
    for _, leaf in leaves:
        if not leaf.is_dir():
            raise FedscoreError(
                f"{str(leaf)!r} lies in a silo folder beside its class folders: in the layout "
                "DIR/<silo>/<class>/<image> every image lies in a class folder")
    names = sorted({leaf.name for _, leaf in leaves})
    if reference is not None and classes is None and not all(n.isdigit() for n in names):
        stray = [n for n in names if n not in reference]
        if stray:
            raise FedscoreError(
                f"the test folder {str(root)!r} has a class folder {stray[0]!r} that the "
                f"training folder lacks (its classes: {sorted(reference)}); set "
                "data.classes to name every class in label order")
        labels_of = reference
    else:
        labels_of = numbering(names, classes, root)
    paths, labels, silos = [], [], []
    for s, leaf in leaves:
        images = _images_in(leaf, root)
        paths += images
        labels += [labels_of[leaf.name]] * len(images)
        silos += [s] * len(images)
    n_classes = (len(classes) if classes is not None
                 else max(labels_of.values()) + 1)
    return Listing(np.asarray(labels, np.int64), np.asarray(silos, np.int64), n_classes,
                   tuple(paths), _stamp(paths)), labels_of


# ---------------------------------------------------------------- folders: decoding


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 1) or (H, W, 3) uint8 pixels of one image file (decoded in full, so a
    truncated or corrupt file fails here, naming the file)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in GREY_MODES:
                return np.array(im.convert("RGB"), dtype=np.uint8)
            if im.mode in ("1", "LA"):  # bilevel 0/1 -> 0/255; grey with alpha: drop alpha
                im = im.convert("L")
            arr = np.array(im)  # a writable copy (torch.from_numpy shares it)
            if arr.dtype != np.uint8:  # 16-bit grey -> 8 bits
                arr = (arr.astype(np.float64) / 257).round().clip(0, 255).astype(np.uint8)
            return arr[..., None]
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error,
            Image.DecompressionBombError) as err:
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise FedscoreError(
            f"{str(path)!r} is not an image that PIL can read ({why}); remove it from the "
            "folder (hidden files, named '.*', are skipped)") from None


def _to_channels(x: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] with C in {1, 3} -> `channels` channels."""
    if x.shape[1] == channels:
        return x
    if channels == 1:  # luma, as PIL's "L"
        w = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.expand(-1, 3, -1, -1).contiguous()


def resize_square(x: Tensor, size: int) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size): the centred square of side min(H, W), then
    resized. When `size` divides the square's side the new pixels are exact block means
    (like `sources._downsample`); otherwise antialiased bilinear interpolation."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s == size:
        return x.contiguous()
    if s % size == 0:
        return torch.nn.functional.avg_pool2d(x, s // size).contiguous()
    return torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    ).clamp(-1, 1).contiguous()


def _assemble(pixels: list[Tensor], names: list[str], image_size: int | None,
              channels: int | None) -> Tensor:
    """One (N, C, H, W) tensor in [-1, 1] from per-image (C, H, W) tensors in [-1, 1]: one
    channel count (the config's, else RGB if any image is colour) and one square size (the
    config's, else every image's own, which must then agree)."""
    c = channels or max(p.shape[0] for p in pixels)
    if image_size is None:
        first = pixels[0].shape[-2:]
        for p, name in zip(pixels, names):
            if p.shape[-2:] != first:
                raise FedscoreError(
                    f"the images differ in size: {names[0]!r} is {first[0]}x{first[1]} and "
                    f"{name!r} is {p.shape[-2]}x{p.shape[-1]} (height x width); set "
                    "data.image_size to crop and resize them all to one square size")
        return _to_channels(torch.stack(pixels), c)
    # resized in batches of one source size (one call per size, not per image: a folder of
    # 2,000 same-size images is one interpolation instead of 2,000)
    out = torch.empty(len(pixels), c, image_size, image_size)
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(pixels):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    for idx in by_shape.values():
        batch = _to_channels(torch.stack([pixels[i] for i in idx]), c)
        out[idx] = resize_square(batch, image_size)
    return out


@functools.lru_cache(maxsize=CACHE_SIZE)
def _decode_folder(files: tuple[Path, ...], stamp: tuple, image_size: int | None,
                   channels: int | None) -> Tensor:
    # `stamp` is only the cache key: an edited file has another size or time
    pixels = [torch.from_numpy(_read_image(f)).permute(2, 0, 1).float() / 127.5 - 1
              for f in files]
    return _assemble(pixels, [str(f) for f in files], image_size, channels)


# ---------------------------------------------------------------- .npz arrays


def _open_npz(path: Path):
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise FedscoreError(f"{str(path)!r} is not a readable .npz file ({why}); save it with "
                            "numpy.savez(path, x=images, y=labels)") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise FedscoreError(f"{str(path)!r} holds one array, not an .npz archive; save it with "
                            "numpy.savez(path, x=images, y=labels)")
    if "x" not in f.files:
        keys = ", ".join(repr(k) for k in f.files) or "none"
        f.close()
        raise FedscoreError(f"{str(path)!r} has no array 'x' (the images); its arrays: {keys}. "
                            "Save the images as x (and the labels as y)")
    return f


def _array(f, key: str, path: Path) -> np.ndarray:
    try:
        return f[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise FedscoreError(f"array {key!r} of {str(path)!r} cannot be read ({err}); arrays "
                            "of Python objects are never unpickled: save plain numbers"
                            ) from None


def _npz_length(f, path: Path) -> int:
    """N of `x` from its header, without reading the pixels."""
    try:
        with f.zip.open("x.npy") as member:
            version = np.lib.format.read_magic(member)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise FedscoreError(f"array 'x' of {str(path)!r} cannot be read ({err})") from None
    if not shape:
        raise FedscoreError(f"'x' of {str(path)!r} is a scalar, not an array of images")
    return int(shape[0])


def _labels_of(f, key: str, n: int, path: Path) -> np.ndarray | None:
    if key not in f.files:
        return None
    a = _array(f, key, path)
    if a.shape != (n,):
        raise FedscoreError(f"{key!r} of {str(path)!r} has shape {a.shape}; it needs one "
                            f"entry per image: shape ({n},)")
    return a


def list_npz(path: Path) -> Listing:
    """An .npz file's labels and silos (reading y and group, not x's pixels)."""
    with _open_npz(path) as f:
        n = _npz_length(f, path)
        if n == 0:
            raise FedscoreError(f"'x' of {str(path)!r} holds no images")
        y = _labels_of(f, "y", n, path)
        g = _labels_of(f, "group", n, path)
    if y is None:
        labels = np.zeros(n, np.int64)
    elif not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise FedscoreError(f"'y' of {str(path)!r} must hold integer labels >= 0 (got dtype "
                            f"{y.dtype}, smallest {y.min()})")
    else:
        labels = y.astype(np.int64)
    groups = None
    if g is not None:
        if not (np.issubdtype(g.dtype, np.integer) or g.dtype.kind in "US"):
            raise FedscoreError(f"'group' of {str(path)!r} must hold integers or strings (one "
                                f"silo name per image), got dtype {g.dtype}")
        groups = np.unique(g, return_inverse=True)[1].astype(np.int64).reshape(-1)
    st = path.stat()
    return Listing(labels, groups, int(labels.max()) + 1, (),
                   ((str(path), st.st_size, st.st_mtime_ns),))


def _layout(x: np.ndarray, path: Path) -> np.ndarray:
    """x as (N, C, H, W): (N, H, W) is grey; a 4-D x is channels-last when only its last
    axis is 1 or 3, channels-first when only its second is; both is ambiguous."""
    shape = tuple(x.shape)
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        last, first = shape[3] in (1, 3), shape[1] in (1, 3)
        if last and first:
            raise FedscoreError(
                f"'x' of {str(path)!r} has shape {shape}, which reads both as (N, H, W, C) "
                "and as (N, C, H, W); save it channels-first (N, C, H, W) with images larger "
                "than 3x3")
        if last:
            return x.transpose(0, 3, 1, 2)
        if first:
            return x
    raise FedscoreError(
        f"'x' of {str(path)!r} has shape {shape}; images are (N, H, W), (N, H, W, C) or "
        "(N, C, H, W) with C = 1 (grey) or 3 (RGB)")


def _scaled(x: np.ndarray, path: Path) -> Tensor:
    """uint8 0..255 or float in [0, 1] / [-1, 1] -> float32 in [-1, 1]."""
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 127.5 - 1)
    if not np.issubdtype(x.dtype, np.floating):
        raise FedscoreError(f"'x' of {str(path)!r} has dtype {x.dtype}; save uint8 pixels "
                            "(0..255) or floats in [0, 1] or [-1, 1]")
    if not np.isfinite(x).all():
        raise FedscoreError(f"'x' of {str(path)!r} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if lo >= 0 and hi <= 1:  # [0, 1] (images that are all >= 0 read as [0, 1])
        return t * 2 - 1
    if lo >= -1 and hi <= 1:
        return t
    raise FedscoreError(f"'x' of {str(path)!r} ranges over [{lo:g}, {hi:g}]; scale it to "
                        "[0, 1] or [-1, 1], or save uint8 pixels 0..255")


@functools.lru_cache(maxsize=CACHE_SIZE)
def _decode_npz(path: Path, stamp: tuple, image_size: int | None, channels: int | None
                ) -> Tensor:
    with _open_npz(path) as f:
        x = _array(f, "x", path)
    x = _scaled(_layout(x, path), path)
    if channels is not None:
        x = _to_channels(x, channels)
    if image_size is not None:
        x = resize_square(x, image_size)
    return x.contiguous()


# ---------------------------------------------------------------- a source's train/test parts


@dataclass(frozen=True)
class _Part:
    listing: Listing
    path: Path
    numbering: dict | None


def _listing(d, key: str, reference: dict | None = None) -> _Part:
    p = _path(d, key)
    if d.name == "folder":
        classes = tuple(d.classes) if d.classes is not None else None
        listing, labels_of = list_folder(p, classes, reference)
        return _Part(listing, p, labels_of)
    return _Part(list_npz(p), p, None)


def _parts(d) -> tuple[_Part, _Part | None]:
    """The training file's listing and the test file's (None: a held-out fraction)."""
    train = _listing(d, "path")
    test = _listing(d, "test_path", train.numbering) if d.test_path else None
    return train, test


def _pixels(d, part: _Part) -> Tensor:
    image_size, channels, _ = _options(d)
    if d.name == "folder":
        x = _decode_folder(part.listing.files, part.listing.stamp, image_size, channels)
    else:
        x = _decode_npz(part.path, part.listing.stamp, image_size, channels)
    h, w = x.shape[-2:]
    if h != w:
        raise FedscoreError(f"the images of {str(part.path)!r} are {h}x{w}, not square; set "
                            "data.image_size to centre-crop and resize them to a square")
    return x


def _strata(listing: Listing) -> np.ndarray:
    """What the held-out split stratifies by: the class, and with silos the (silo, class)
    pair, so that every silo keeps its own share of every class for training."""
    if listing.groups is None:
        return listing.labels
    return listing.groups * (int(listing.labels.max()) + 1) + listing.labels


def _select(d, train: _Part, test: _Part | None, split: str, allow_empty: bool = False
            ) -> tuple[_Part, np.ndarray]:
    """(the part a split reads from, the indices of the split within it); an empty split is
    an error unless allowed (`split="all"` of a folder too small for a test split)."""
    if test is not None:
        part = train if split == "train" else test
        return part, np.arange(len(part.listing.labels))
    idx = split_indices(_strata(train.listing), split, seed=d.split_seed,
                        fraction=d.test_fraction)
    if len(idx) == 0 and not allow_empty:
        raise FedscoreError(
            f"the {split} split of {str(train.path)!r} is empty: with "
            f"data.test_fraction={d.test_fraction}, each class sends round(fraction x its "
            "images) to the test split; change data.test_fraction, add images, or give a "
            "separate data.test_path")
    return train, idx


def _one(d, split: str, allow_empty: bool = False
         ) -> tuple[Tensor, Tensor, np.ndarray | None]:
    """Images, labels and silos (or None) of "train" or "test"; train with mirror images."""
    train, test = _parts(d)
    part, idx = _select(d, train, test, split, allow_empty)
    x = _pixels(d, part)[torch.as_tensor(idx)]
    y = torch.from_numpy(part.listing.labels[idx])
    g = part.listing.groups[idx] if part.listing.groups is not None else None
    if split == "train" and d.hflip:  # flip augmentation: each image's mirror appended
        x = torch.cat([x, x.flip(-1)])
        y = torch.cat([y, y])
        g = None if g is None else np.concatenate([g, g])
    return x.contiguous(), y.clone(), g


def load(d, split: str) -> tuple[Tensor, Tensor]:
    """Own data's split: images (N, C, H, W) float32 in [-1, 1], labels (N,) int64."""
    if split == "all":
        (x0, y0, _), (x1, y1, _) = _one(d, "train", True), _one(d, "test", True)
        return torch.cat([x0, x1]), torch.cat([y0, y1])
    x, y, _ = _one(d, split)
    return x, y


def groups(d, split: str) -> np.ndarray | None:
    """The silo id of each item of `load(d, split)`, or None when the data give none."""
    if split == "all":
        g0, g1 = _one(d, "train", True)[2], _one(d, "test", True)[2]
        return None if g0 is None or g1 is None else np.concatenate([g0, g1])
    return _one(d, split)[2]


def info(d) -> DatasetInfo:
    """Shape, classes and split sizes of own data. With data.image_size and data.channels
    both set no pixel is decoded (the folder is listed, the .npz's labels read); otherwise
    the training images are decoded (and cached) for their size and channels."""
    train, test = _parts(d)
    sizes = {}
    for split in ("train", "test"):
        part = train if test is None or split == "train" else test
        n = (len(part.listing.labels) if test is not None else
             len(split_indices(_strata(train.listing), split, seed=d.split_seed,
                               fraction=d.test_fraction)))
        sizes[split] = n * (2 if split == "train" and d.hflip else 1)
    if d.image_size is not None and d.channels is not None:
        shape = (d.channels, d.image_size, d.image_size)
    else:
        shape = tuple(_pixels(d, train).shape[1:])
    classes = max(train.listing.classes, test.listing.classes if test else 1)
    if d.classes is not None:
        classes = len(d.classes)
    what = "image folder" if d.name == "folder" else "arrays"
    return DatasetInfo(d.name, shape, classes, sizes, f"your own {what} {str(train.path)!r}")


def clear_cache() -> None:
    """Forget the decoded arrays (tests; a long session that edited its files in place
    within one second of reading them)."""
    _decode_folder.cache_clear()
    _decode_npz.cache_clear()
