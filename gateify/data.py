"""Image classification data for fine-tuning: CIFAR-10, any ImageFolder tree, and an offline default.

* ``cifar10``: the standard python-batch layout (``DIR/cifar-10-batches-py/data_batch_1..5, test_batch``), as
  torchvision reads it. The batches are pickles; they are read with an unpickler that admits only the numpy array
  constructors those files use, so a tampered file cannot run code. ``download=True`` fetches and md5-checks the
  official archive (needs network).
* ``folder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``), any image size, grayscale or
  colour: ``in_chans`` follows the data, images are resized (longer side) and zero-padded to the input size.
* ``digits``: the offline default. scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes, shipped
  inside the scikit-learn package), upsampled to the input size, split 75/25 stratified with a fixed seed.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD
from .errors import DatasetError

__all__ = ["DATASETS", "DataSplits", "DatasetError", "load_dataset", "read_cifar10"]

DATASETS = ("cifar10", "folder", "digits")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class DataSplits:
    """Train and test sets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    calibration: Dataset  # the training images without augmentation: for choices made on training data
    classes: Sequence[str]
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

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


def _cifar10(root: Optional[str], size: int, download: bool) -> DataSplits:
    root = root or "data"
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            download_and_extract_archive(CIFAR10_URL, root, md5=CIFAR10_MD5)
    train_x, train_y = read_cifar10(root, train=True)
    test_x, test_y = read_cifar10(root, train=False)
    if size != 32:
        train_x, test_x = _resize(train_x, size), _resize(test_x, size)
    train_t, test_t = _transforms(CIFAR10_MEAN, CIFAR10_STD, size, flip=True)
    return DataSplits(TensorImages(train_x, train_y, train_t), TensorImages(test_x, test_y, test_t),
                      TensorImages(train_x, train_y, test_t), CIFAR10_CLASSES, 3, size, CIFAR10_MEAN, CIFAR10_STD)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def _digits(size: int) -> DataSplits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DatasetError("the offline default needs scikit-learn: pip install 'gateify[train]'.") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.25, stratify=labels.numpy(),
                                           random_state=0)
    images = _resize(images, size)
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = _stats(train_x)
    train_t, test_t = _transforms(mean, std, size, flip=False)  # digits are not mirror-symmetric
    train_y, test_y = labels[train_idx], labels[test_idx]
    return DataSplits(TensorImages(train_x, train_y, train_t), TensorImages(test_x, test_y, test_t),
                      TensorImages(train_x, train_y, test_t), [str(i) for i in range(10)], 1, size, mean, std)


def _open_image(path: str):  # noqa: ANN202 (PIL image)
    """Open without ImageFolder's conversion to RGB, so grayscale data stays one channel."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


class _ConvertMode:
    """PIL image -> ``mode`` ('L' or 'RGB'); a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):  # noqa: ANN001, ANN204 (PIL image)
        return image.convert(self.mode)


def _folder(root: Optional[str], size: int) -> DataSplits:
    from torchvision.datasets import ImageFolder

    if not root or not os.path.isdir(os.path.join(root, "train")):
        raise DatasetError(f"--dataset folder needs --data-dir with a train/ subfolder (DIR/train/<class>/<image>) "
                           f"and val/ or test/ beside it; '{root}' has no train/.")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if test_dir is None:
        raise DatasetError(f"'{root}' has train/ but neither val/ nor test/ to evaluate on.")
    probe = ImageFolder(os.path.join(root, "train"), loader=_open_image)
    if not len(probe):
        raise DatasetError(f"'{root}/train' holds no images.")
    gray = probe.loader(probe.samples[0][0]).mode in ("1", "L", "I", "I;16", "F")
    mode = "L" if gray else "RGB"
    base = v2.Compose([_ConvertMode(mode), v2.PILToTensor(),
                       v2.Resize(size=None, max_size=size, antialias=True), v2.CenterCrop(size)])
    sample = torch.stack([base(probe.loader(p)) for p, _ in probe.samples[:: max(1, len(probe) // 1000)]])
    mean, std = _stats(sample)
    train_t, test_t = _transforms(mean, std, size, flip=True)
    train = ImageFolder(os.path.join(root, "train"), transform=v2.Compose([base, train_t]), loader=_open_image)
    test = ImageFolder(test_dir, transform=v2.Compose([base, test_t]), loader=_open_image)
    calibration = ImageFolder(os.path.join(root, "train"), transform=v2.Compose([base, test_t]), loader=_open_image)
    if test.classes != train.classes:
        raise DatasetError(f"class folders differ between '{root}/train' and '{test_dir}': "
                           f"{train.classes} vs {test.classes}.")
    return DataSplits(train, test, calibration, train.classes, 1 if gray else 3, size, mean, std)


def load_dataset(name: str, data_dir: Optional[str] = None, input_size: int = 32, download: bool = False) -> DataSplits:
    """Load one of :data:`DATASETS` (see module doc) at ``input_size`` x ``input_size``."""
    if name == "cifar10":
        return _cifar10(data_dir, input_size, download)
    if name == "folder":
        return _folder(data_dir, input_size)
    if name == "digits":
        return _digits(input_size)
    raise DatasetError(f"unknown dataset {name!r}; use one of {DATASETS}.")
