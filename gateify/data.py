"""Image classification data for fine-tuning: CIFAR-10, any ImageFolder tree, and four offline datasets.

Every dataset comes as train / val / test: choices made on data (which blocks static pruning removes, routing
thresholds) use ``val`` (held out from training), never ``test``.

Every dataset reaches the model's input size through one function, :func:`fit_to_size`, with one policy
(``fit``, recorded in ``DataSplits.fit`` and in every ``metrics.json`` the examples write):

* ``"pad"`` (the default): an image no larger than the input on either side keeps its pixels and is centred on a
  zero (black) canvas, as MNIST-to-32 pipelines do: a 28x28 image reaches a 32x32 input inside a 2-pixel border.
* ``"stretch"``: it is resized (bilinear, aspect ratio kept) until its longer side fills the input.

Larger images are resized (longer side to the input size, antialiased) and centre-cropped either way, the shorter
side zero-padded. Why ``pad`` is the default: on held-out 28x28 data it beat stretching by 2.2 points (issue 24);
a 3-seed A/B on animals-c and digits-c (``benchmarks/pad_vs_stretch.py``, docs/results.md) found a tie there
(+0.40 ± 0.88 and -0.32 ± 2.87 points), and padding resamples nothing.

* ``cifar10``: the standard python-batch layout (``DIR/cifar-10-batches-py/data_batch_1..5, test_batch``), as
  torchvision reads it. The batches are pickles; they are read with an unpickler that admits only the numpy array
  constructors those files use, so a tampered file cannot run code. ``download=True`` fetches and md5-checks the
  official archive (needs network).
* ``folder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``), any image size, grayscale or
  colour: ``in_chans`` follows the data.
* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 real images with 16 grey levels, 10 classes, shipped
  inside the scikit-learn package), upsampled once to 28x28 (bilinear) as the dataset's own resolution, split
  67.5/7.5/25 stratified with a fixed seed. Easy: every model of a ResNet-20's size reaches ~99.8%, so it cannot
  tell methods apart.
* ``digits-c``: a second, small corrupted benchmark: the same 28x28 digits, corrupted by :func:`corrupt` like
  animals-c (see ``DIGITS_C`` for its clean share and severities), split 50/10/40 stratified with a fixed seed:
  898 train, 180 val, 719 test. A ResNet-20 reaches ~94% on it, but with so few training images depth matters
  little once it is trained long enough (docs/results.md): use it for quick checks, not as a confirmation.
* ``animals``: the real 28x28 animal silhouettes (10 classes) shipped inside the ``animal-mnist`` wheel
  (MIT; install it with ``pip install --no-deps animal-mnist==0.4``: its declared TensorFlow dependency is not
  needed, gateify reads the two data files only, with the same restricted unpickler).
* ``animals-c``: the offline benchmark where depth matters. The same silhouettes, each corrupted once, the way
  robustness benchmarks (CIFAR-10-C) corrupt: 20% stay clean, the others get one of Gaussian noise, blur,
  occlusion, contrast loss or pixelation at a severity drawn from 1-5 (fixed seed, so the dataset is the same
  everywhere). Samples differ in difficulty, so a model that gives hard inputs more depth than easy ones can win.

The packaged sources are de-duplicated before they are split (:func:`unique_images`: pixel-identical images are
kept once; identical images with different labels would all be dropped, none occur), so that no test image has a
twin in the training split. animal-mnist 0.4's 10,000 images hold 284
identical pairs (9,716 unique images); scikit-learn's digits hold none. Splits of ``animals``/``animals-c``:
50% train, 10% val, 40% test of every class (stratified, fixed): 4,856 / 973 / 3,887 images. Other datasets hold
out 10% of train as val (stratified, fixed), or use ``DIR/val`` of a folder tree that also has ``DIR/test``.

Each packaged dataset has a version (:data:`VERSIONS`, ``DataSplits.version``): a new one whenever its images or
its split change, so that numbers from different versions are never compared by mistake. ``animals/1`` and
``animals-c/1`` were the versions before de-duplication (5,000 / 1,000 / 4,000 images; 155 identical pairs
straddled two splits, and 107 test images, 2.7% of them and 17% of the test birds, had a twin in the training
split); ``digits/1`` upsampled the 8x8 images straight to the input size.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD
from .errors import DatasetError

__all__ = ["DATASETS", "VERSIONS", "FITS", "DEFAULT_FIT", "CORRUPTIONS", "DataSplits", "load_dataset", "fit_to_size",
           "unique_images", "read_cifar10", "read_animals", "read_digits", "corrupt"]

_logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "folder", "digits", "digits-c", "animals", "animals-c")
#: what each dataset's images and split are; a new version whenever either changes. A folder is the user's own data.
VERSIONS: dict[str, Optional[str]] = {"cifar10": "cifar10/1", "folder": None, "digits": "digits/2",
                                      "digits-c": "digits-c/1", "animals": "animals/2", "animals-c": "animals-c/2"}
#: how an image smaller than the input reaches it (:func:`fit_to_size`)
FITS = ("pad", "stretch")
DEFAULT_FIT = "pad"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class DataSplits:
    """Train, validation and test sets plus what a model needs to know about them."""

    train: Dataset
    val: Dataset  # held out from training, without augmentation: for every choice made on data
    test: Dataset
    calibration: Dataset  # the training images without augmentation
    classes: Sequence[str]
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    version: Optional[str] = None  # VERSIONS[name]: what the images and the split are
    fit: str = DEFAULT_FIT  # how images smaller than input_size reached it (fit_to_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TensorImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels ``(N,)`` with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def _transforms(mean: Sequence[float], std: Sequence[float], size: int, flip: bool) -> tuple[v2.Transform, v2.Transform]:
    """Standard CIFAR augmentation (random crop with 4-pixel zero padding, horizontal flip) and normalisation."""
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    train = [v2.RandomCrop(size, padding=size // 8)] + ([v2.RandomHorizontalFlip()] if flip else []) + norm
    return v2.Compose(train), v2.Compose(norm)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches contain: dicts, lists, bytes and numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle protocol)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': a CIFAR-10 batch holds only arrays")


def _read_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"'{path}' is not a readable CIFAR-10 batch ({type(e).__name__}: {e}). Delete the "
                           f"folder and fetch it again (--download on a networked machine).") from e
    if images.dtype != torch.uint8 or len(images) != len(labels):
        raise DatasetError(f"'{path}' is not a CIFAR-10 batch: expected uint8 images with one label each.")
    return images, torch.tensor(labels, dtype=torch.int64)


def read_cifar10(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from ``root/cifar-10-batches-py``: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found: '{folder}' lacks {', '.join(missing)}. Get it with "
            f"`python examples/finetune_cifar.py --download --data-dir {root}` on a machine with network, or "
            f"download {CIFAR10_URL} and extract it into '{root}'. For a run without any download, use "
            f"--dataset digits (real images shipped with scikit-learn).")
    parts = [_read_batch(os.path.join(folder, n)) for n in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _stratified_split(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Indices of consecutive parts of every class in ``fractions`` (summing to 1), shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = [round(len(idx) * sum(fractions[:i])) for i in range(len(fractions) + 1)]
        for i in range(1, len(fractions)):  # a tiny class still puts one sample in every part that asks for some
            if len(idx) >= len(fractions):
                bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), len(idx) - (len(fractions) - i))
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i]:bounds[i + 1]])
    return [torch.cat(p).sort().values for p in parts]


def fit_to_size(images: torch.Tensor, size: int, fit: str = DEFAULT_FIT) -> torch.Tensor:
    """uint8 images ``(..., C, H, W)`` to ``(..., C, size, size)``, the one way every dataset reaches the input.

    ``fit="pad"``: an image no larger than ``size`` on either side keeps its pixels, centred on a zero canvas (an odd
    difference puts the extra row/column at the bottom/right): 28x28 in 32x32 gets a 2-pixel border.
    ``fit="stretch"``: it is resized (bilinear, aspect ratio kept) until its longer side is ``size``.
    A larger image is resized (longer side to ``size``, bilinear, antialiased) and centre-cropped with either policy,
    its shorter side zero-padded: torchvision's ``Resize(None, max_size=size)`` then ``CenterCrop(size)``.
    """
    if fit not in FITS:
        raise DatasetError(f"unknown fit {fit!r}; use one of {FITS} (pad: images smaller than the input keep their "
                           f"pixels inside a zero border; stretch: they are upsampled).")
    height, width = images.shape[-2:]
    if fit == "stretch" or height > size or width > size:
        images = TF.resize(images, size=None, max_size=size, antialias=True)
    return TF.center_crop(images, [size, size])


def _check_fit(height: int, width: int, size: int, fit: str, name: str) -> None:
    """A padded image that fills less than half the input's side is almost all border: say how to stretch it."""
    if fit == "pad" and 2 * max(height, width) <= size:
        _logger.warning("%s: %dx%d images padded into a %dx%d input fill %.0f%% of it; fit='stretch' (--fit stretch) "
                        "upsamples them instead", name, height, width, size, size, 100 * height * width / size ** 2)


def unique_images(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Indices (sorted) of the images to keep so that no two are pixel-identical: the first of every group with the
    same SHA-256 of its uint8 pixels ``(C, H, W)``. A group whose images carry different labels is dropped whole
    (no label of it can be trusted). De-duplicate a source before splitting it, so no test image has a training twin."""
    groups: dict[bytes, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(hashlib.sha256(image.contiguous().numpy().tobytes()).digest(), []).append(i)
    keep, conflicting = [], 0
    for members in groups.values():
        if len(set(labels[members].tolist())) > 1:
            conflicting += 1
        else:
            keep.append(members[0])
    if len(keep) < len(images):
        _logger.info("%d pixel-identical duplicates dropped (%d groups with conflicting labels dropped whole)",
                     len(images) - len(keep), conflicting)
    return torch.tensor(sorted(keep), dtype=torch.int64)


def _tensor_splits(images: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
                   test: torch.Tensor, classes: Sequence[str], flip: bool, size: int, fit: str, version: str,
                   stats: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None) -> DataSplits:
    """uint8 images ``(N, C, H, W)`` brought to ``size`` by :func:`fit_to_size` and split by index; normalised with
    ``stats`` or the training images' own."""
    _check_fit(images.shape[-2], images.shape[-1], size, fit, version)
    images = fit_to_size(images, size, fit)
    mean, std = stats or _stats(images[train])
    train_t, test_t = _transforms(mean, std, size, flip=flip)
    part = lambda idx, t: TensorImages(images[idx], labels[idx], t)  # noqa: E731
    return DataSplits(part(train, train_t), part(val, test_t), part(test, test_t), part(train, test_t), classes,
                      images.shape[1], size, mean, std, version=version, fit=fit)


def _cifar10(root: Optional[str], size: int, download: bool, fit: str) -> DataSplits:
    root = root or "data"
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            download_and_extract_archive(CIFAR10_URL, root, md5=CIFAR10_MD5)
    train_x, train_y = read_cifar10(root, train=True)
    test_x, test_y = read_cifar10(root, train=False)
    images, labels = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    train, val = _stratified_split(train_y, (0.9, 0.1), seed=0)
    test = torch.arange(len(train_y), len(labels))
    return _tensor_splits(images, labels, train, val, test, CIFAR10_CLASSES, flip=True, size=size, fit=fit,
                          version=VERSIONS["cifar10"], stats=(CIFAR10_MEAN, CIFAR10_STD))


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


DIGITS_SIZE = 28  # the digits datasets' own resolution, that of animals-c


def read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, de-duplicated (:func:`unique_images` on the 8x8 sources; they hold no duplicates) and
    upsampled once to 28x28 (bilinear): uint8 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError("the digits datasets need scikit-learn: pip install 'gateify[train]'.") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    keep = unique_images(images, labels)
    return fit_to_size(images[keep], DIGITS_SIZE, "stretch"), labels[keep]


#: digits-c's corruption: the animals-c pipeline (:func:`corrupt`), with this clean share and severity range
DIGITS_C = {"clean": 0.2, "severity": (1, 5)}


@functools.lru_cache(maxsize=4)  # a sweep loads it once per run: build it once per process
def _digits(size: int, corrupted: bool, fit: str) -> DataSplits:
    images, labels = read_digits()
    if corrupted:
        images = corrupt(images, seed=0, **DIGITS_C)[0]
        train, val, test = _stratified_split(labels, (0.5, 0.1, 0.4), seed=0)
    else:
        train, val, test = _stratified_split(labels, (0.675, 0.075, 0.25), seed=0)
    # digits are not mirror-symmetric: no flip
    return _tensor_splits(images, labels, train, val, test, [str(i) for i in range(10)], flip=False, size=size,
                          fit=fit, version=VERSIONS["digits-c" if corrupted else "digits"])


ANIMALS_PACKAGE = "animal-mnist==0.4"
ANIMALS_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _read_array_pickle(path: str) -> "numpy.ndarray":  # noqa: F821 (numpy is a torch dependency)
    """A gzipped pickle of one numpy array, read with the restricted unpickler: nothing else can be loaded."""
    try:
        with gzip.open(path, "rb") as f:
            array = _ArrayUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"'{path}' is not a readable array file ({type(e).__name__}: {e}). Reinstall it: "
                           f"pip install --force-reinstall --no-deps {ANIMALS_PACKAGE}") from e
    if not hasattr(array, "dtype"):
        raise DatasetError(f"'{path}' holds a {type(array).__name__}, not an array.")
    return array


def read_animals(folder: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The animal-mnist silhouettes: uint8 images ``(10000, 1, 28, 28)`` and int64 labels ``(10000,)``.

    ``folder`` holds ``animal_data_version_3.gz`` and ``animal_label_version_3.gz``; default: the installed
    ``animal_mnist`` package's data folder, found without importing the package (its code needs TensorFlow).
    """
    if folder is None:
        spec = importlib.util.find_spec("animal_mnist")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetError(f"the animals datasets read the images shipped in the animal-mnist wheel, which is "
                               f"not installed: pip install --no-deps {ANIMALS_PACKAGE} (--no-deps: its declared "
                               f"TensorFlow dependency is not needed). `make run` and `make test` install it.")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    paths = [os.path.join(folder, f"animal_{part}_version_3.gz") for part in ("data", "label")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{missing} not found: reinstall with pip install --force-reinstall --no-deps "
                           f"{ANIMALS_PACKAGE}.")
    data, labels = (_read_array_pickle(p) for p in paths)
    images = torch.from_numpy(data.astype("uint8").copy()).unsqueeze(1)
    labels = torch.from_numpy(labels.astype("int64").copy())
    if images.shape[1:] != (1, 28, 28) or len(images) != len(labels) or not 0 <= int(labels.min()) <= int(
            labels.max()) < len(ANIMALS_CLASSES):
        raise DatasetError(f"'{folder}' does not hold 28x28 images with labels 0-9 (images {tuple(images.shape)}, "
                           f"{len(labels)} labels).")
    return images, labels


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    w = torch.exp(-t * t / (2 * sigma * sigma))
    w = w / w.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), w.view(1, 1, -1, 1))


def _noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=g) * 0.08 * s


def _blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return _gaussian_blur(x, 0.2 + 0.4 * s)


def _occlusion(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    side = x.shape[-1]
    for _ in range(s):  # s grey patches of 5-9 pixels per image
        size = torch.randint(5, 10, (len(x),), generator=g)
        corner = (torch.rand(len(x), 2, generator=g) * (side - size)[:, None]).long()
        grey = torch.rand(len(x), generator=g)
        for i in range(len(x)):
            (r, c), z = corner[i].tolist(), int(size[i])
            x[i, ..., r:r + z, c:c + z] = grey[i]
    return x


def _contrast(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (0.5, 0.35, 0.25, 0.16, 0.10)[s - 1] + mean


def _pixelate(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    small = max(4, int(side * (0.7, 0.55, 0.45, 0.35, 0.28)[s - 1]))
    return F.interpolate(F.interpolate(x, size=(small, small), mode="area"), size=(side, side), mode="nearest")


#: the corruptions of ``animals-c``: name -> f(images (N, 1, H, W) in [0, 1], severity 1-5, generator)
CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "noise": _noise, "blur": _blur, "occlusion": _occlusion, "contrast": _contrast, "pixelate": _pixelate}


def corrupt(images: torch.Tensor, seed: int = 0, clean: float = 0.2,
            severity: tuple[int, int] = (1, 5)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each uint8 image ``(N, 1, H, W)`` left clean with probability ``clean``, else one corruption of
    :data:`CORRUPTIONS` at a severity drawn uniformly from ``severity`` (lowest, highest; within 1-5). Returns the
    images and, per image, the corruption's index (-1: clean) and severity (0: clean); the same for a given ``seed``."""
    low, high = severity
    if not 1 <= low <= high <= 5:
        raise DatasetError(f"severity {severity}: expected (lowest, highest) with 1 <= lowest <= highest <= 5.")
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    corrupted = torch.rand(n, generator=g) >= clean
    kind = torch.where(corrupted, torch.randint(0, len(CORRUPTIONS), (n,), generator=g), -1)
    severity = torch.where(corrupted, torch.randint(low, high + 1, (n,), generator=g), 0)
    out = images.clone()
    x = images.float() / 255
    for k, fn in enumerate(CORRUPTIONS.values()):  # one batch per corruption and severity
        for s in range(1, 6):
            idx = ((kind == k) & (severity == s)).nonzero().squeeze(1)
            if len(idx):
                out[idx] = fn(x[idx], s, g).clamp(0, 1).mul(255).round().to(torch.uint8)
    return out, kind, severity


@functools.lru_cache(maxsize=4)  # a sweep loads it once per run: build it once per process
def _animals(size: int, corrupted: bool, fit: str) -> DataSplits:
    images, labels = read_animals()
    keep = unique_images(images, labels)  # 284 identical pairs: hashed before splitting, kept once
    images, labels = images[keep], labels[keep]
    if corrupted:
        images = corrupt(images, seed=0)[0]
    train, val, test = _stratified_split(labels, (0.5, 0.1, 0.4), seed=0)
    return _tensor_splits(images, labels, train, val, test, ANIMALS_CLASSES, flip=True, size=size, fit=fit,
                          version=VERSIONS["animals-c" if corrupted else "animals"])


def _open_image(path: str):  # noqa: ANN202 (PIL image)
    """Open without ImageFolder's conversion to RGB, so grayscale data stays one channel."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


class _Fit:
    """:func:`fit_to_size` as a per-image transform (a class, so DataLoader workers can pickle it)."""

    def __init__(self, size: int, fit: str) -> None:
        self.size, self.fit = size, fit

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return fit_to_size(image, self.size, self.fit)


class _ConvertMode:
    """PIL image -> ``mode`` ('L' or 'RGB'); a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):  # noqa: ANN001, ANN204 (PIL image)
        return image.convert(self.mode)


def _folder(root: Optional[str], size: int, fit: str) -> DataSplits:
    from torchvision.datasets import ImageFolder

    if not root or not os.path.isdir(os.path.join(root, "train")):
        raise DatasetError(f"--dataset folder needs --data-dir with a train/ subfolder (DIR/train/<class>/<image>) "
                           f"and val/ or test/ beside it; '{root}' has no train/.")
    present = [d for d in ("val", "test") if os.path.isdir(os.path.join(root, d))]
    if not present:
        raise DatasetError(f"'{root}' has train/ but neither val/ nor test/ to evaluate on.")
    probe = ImageFolder(os.path.join(root, "train"), loader=_open_image)
    if not len(probe):
        raise DatasetError(f"'{root}/train' holds no images.")
    first = probe.loader(probe.samples[0][0])
    gray = first.mode in ("1", "L", "I", "I;16", "F")
    mode = "L" if gray else "RGB"
    _check_fit(first.height, first.width, size, fit, root)
    base = v2.Compose([_ConvertMode(mode), v2.PILToTensor(), _Fit(size, fit)])
    sample = torch.stack([base(probe.loader(p)) for p, _ in probe.samples[:: max(1, len(probe) // 1000)]])
    mean, std = _stats(sample)
    train_t, test_t = _transforms(mean, std, size, flip=True)

    def folder(name: str, transform: v2.Transform) -> ImageFolder:
        data = ImageFolder(os.path.join(root, name), transform=v2.Compose([base, transform]), loader=_open_image)
        if data.classes != probe.classes:
            raise DatasetError(f"class folders differ between '{root}/train' and '{root}/{name}': "
                               f"{probe.classes} vs {data.classes}.")
        return data

    train, calibration = folder("train", train_t), folder("train", test_t)
    test = folder(present[-1], test_t)  # test/ when there is one, else val/
    if len(present) == 2:
        return DataSplits(train, folder("val", test_t), test, calibration, train.classes, 1 if gray else 3, size,
                          mean, std, version=VERSIONS["folder"], fit=fit)
    labels = torch.tensor(train.targets)
    train_idx, val_idx = _stratified_split(labels, (0.9, 0.1), seed=0)
    return DataSplits(Subset(train, train_idx.tolist()), Subset(calibration, val_idx.tolist()), test,
                      Subset(calibration, train_idx.tolist()), train.classes, 1 if gray else 3, size, mean, std,
                      version=VERSIONS["folder"], fit=fit)


def load_dataset(name: str, data_dir: Optional[str] = None, input_size: int = 32, download: bool = False,
                 fit: str = DEFAULT_FIT) -> DataSplits:
    """Load one of :data:`DATASETS` (see module doc) at ``input_size`` x ``input_size``; images smaller than that
    are padded or stretched to it as ``fit`` says (:func:`fit_to_size`), larger ones resized and centre-cropped."""
    if fit not in FITS:
        raise DatasetError(f"unknown fit {fit!r}; use one of {FITS}.")
    if name == "cifar10":
        return _cifar10(data_dir, input_size, download, fit)
    if name == "folder":
        return _folder(data_dir, input_size, fit)
    if name in ("digits", "digits-c"):
        return _digits(input_size, name == "digits-c", fit)
    if name in ("animals", "animals-c"):
        return _animals(input_size, name == "animals-c", fit)
    raise DatasetError(f"unknown dataset {name!r}; use one of {DATASETS}.")
