"""Data loading: CIFAR-10's python-batch layout (without unsafe unpickling), ImageFolder trees, the offline default."""

import gzip
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gateify.data import DatasetError, corrupt, load_dataset, read_animals, read_cifar10


def write_cifar(root, per_batch=6):
    """A CIFAR-10 tree in the standard layout, with known pixels: what torchvision's reader expects."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_layout_round_trips(tmp_path):
    written = write_cifar(str(tmp_path))
    images, labels = read_cifar10(str(tmp_path), train=True)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    data, first_labels = written["data_batch_1"]
    assert torch.equal(images[:6], torch.from_numpy(data.reshape(6, 3, 32, 32)))
    assert labels[:6].tolist() == first_labels
    splits = load_dataset("cifar10", str(tmp_path))
    assert len(splits.train) + len(splits.val) == 30 and len(splits.test) == 6
    assert splits.in_chans == 3 and splits.num_classes == 10
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == written["test_batch"][1][0]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/gateify_pwned",))


def test_cifar10_batch_cannot_run_code(tmp_path):
    write_cifar(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load 'posix.system'"):
        read_cifar10(str(tmp_path), train=False)
    assert not os.path.exists("/tmp/gateify_pwned")


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "--download" in message and "digits" in message and "data_batch_1" in message


def test_truncated_cifar10_batch(tmp_path):
    write_cifar(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="data_batch_3"):
        read_cifar10(str(tmp_path), train=True)


def write_folder(root, mode, sizes, classes=("cat", "dog"), splits=("train", "val")):
    rng = np.random.default_rng(1)
    for split in splits:
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i, size in enumerate(sizes):
                shape = size[::-1] + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    os.path.join(root, split, c, f"{i}.png"))


@pytest.mark.parametrize("mode,chans", [("L", 1), ("RGB", 3)])
def test_folder_any_size_and_channels(tmp_path, mode, chans):
    write_folder(str(tmp_path), mode, sizes=[(20, 12), (64, 48), (33, 33)])
    splits = load_dataset("folder", str(tmp_path), input_size=32)
    assert splits.in_chans == chans and list(splits.classes) == ["cat", "dog"]
    for dataset in (splits.train, splits.val, splits.test, splits.calibration):
        x, y = dataset[0]
        assert x.shape == (chans, 32, 32) and y in (0, 1)
    # no test/ folder: val/ is the test set and the validation set is held out of train/
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 6


def test_folder_with_val_and_test_keeps_both(tmp_path):
    write_folder(str(tmp_path), "L", sizes=[(16, 16)] * 3, splits=("train", "val", "test"))
    splits = load_dataset("folder", str(tmp_path), input_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 6)
    assert splits.val.root.endswith("val") and splits.test.root.endswith("test")


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="train/"):
        load_dataset("folder", str(tmp_path))
    write_folder(str(tmp_path / "a"), "L", [(8, 8)], splits=("train",))
    with pytest.raises(DatasetError, match="neither val/ nor test/"):
        load_dataset("folder", str(tmp_path / "a"))
    write_folder(str(tmp_path / "b"), "L", [(8, 8)], splits=("train",))
    write_folder(str(tmp_path / "b"), "L", [(8, 8)], classes=("cat", "cow"), splits=("test",))
    with pytest.raises(DatasetError, match="class folders differ"):
        load_dataset("folder", str(tmp_path / "b"))


def test_digits_are_real_and_split_three_ways():
    splits = load_dataset("digits", input_size=32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1213, 134, 450)
    assert (splits.in_chans, splits.num_classes) == (1, 10)
    parts = [set(map(tuple, d.images.flatten(1)[:, ::7].tolist())) for d in (splits.train, splits.val, splits.test)]
    assert not parts[1] & parts[2]  # validation images are not test images
    again = load_dataset("digits", input_size=32)
    assert torch.equal(splits.test.images, again.test.images)  # a fixed split
    # real images: a nearest-class-mean classifier on raw pixels already separates them (noise would give ~10%)
    train_x, train_y = splits.train.images.float().flatten(1), splits.train.labels
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(10)])
    test_x = splits.test.images.float().flatten(1)
    accuracy = (torch.cdist(test_x, means).argmin(1) == splits.test.labels).float().mean()
    assert accuracy > 0.85
    assert splits.train[0][0].shape == (1, 32, 32)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def test_animals_are_the_real_silhouettes_from_the_installed_wheel():
    images, labels = read_animals()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10  # 1,000 silhouettes per class, as the package says
    # silhouettes: mostly black background and white shapes, few grey pixels (noise would be spread out)
    extremes = ((images < 30) | (images > 225)).float().mean()
    assert extremes > 0.8


def test_animals_c_corrupts_each_image_once_and_the_same_way_everywhere():
    clean, labels = read_animals()
    images, kind, severity = corrupt(clean[:400], seed=0)
    again = corrupt(clean[:400], seed=0)[0]
    assert torch.equal(images, again)
    untouched = kind == -1
    assert 0.1 < untouched.float().mean() < 0.3  # 20% stay clean
    assert torch.equal(images[untouched], clean[:400][untouched])
    assert not torch.equal(images[~untouched], clean[:400][~untouched])
    assert set(severity[~untouched].tolist()) <= {1, 2, 3, 4, 5} and set(kind[~untouched].tolist()) == set(range(5))
    splits = load_dataset("animals-c", input_size=32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5000, 1000, 4000)
    assert splits.num_classes == 10 and splits.in_chans == 1
    assert torch.bincount(splits.test.labels).tolist() == [400] * 10  # stratified
    x, _ = splits.test[0]
    assert x.shape == (1, 32, 32)


def test_animals_refuse_code_in_their_data_files(tmp_path):
    with gzip.open(tmp_path / "animal_data_version_3.gz", "wb") as f:
        pickle.dump(Exploit(), f)
    with gzip.open(tmp_path / "animal_label_version_3.gz", "wb") as f:
        pickle.dump(np.zeros(3, dtype=np.int64), f)
    with pytest.raises(DatasetError, match="refusing to load 'posix.system'"):
        read_animals(str(tmp_path))
    assert not os.path.exists("/tmp/gateify_pwned")


def test_missing_animals_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DatasetError, match="pip install --no-deps animal-mnist==0.4"):
        read_animals()
