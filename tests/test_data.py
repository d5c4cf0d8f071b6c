"""Data loading: CIFAR-10's python-batch layout (without unsafe unpickling), ImageFolder trees, the offline
benchmarks (de-duplicated before splitting), and the one way every dataset reaches the input size."""

import gzip
import hashlib
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from torchvision.transforms import v2

from gateify.data import (DIGITS_C, VERSIONS, DatasetError, _stratified_split, corrupt, fit_to_size, load_dataset,
                          read_animals, read_cifar10, read_digits, unique_images)


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


def unnormalised(x, splits):
    """A normalised input ``(C, S, S)`` back to the uint8 pixels it was made from."""
    mean, std = torch.tensor(splits.mean).view(-1, 1, 1), torch.tensor(splits.std).view(-1, 1, 1)
    return (x * std + mean).mul(255).round().to(torch.uint8)


def test_a_28x28_folder_image_reaches_the_model_inside_a_2_pixel_border(tmp_path):
    write_folder(str(tmp_path), "L", sizes=[(28, 28)] * 2)
    splits = load_dataset("folder", str(tmp_path), input_size=32)  # the default: pad
    assert splits.fit == "pad" and splits.input_size == 32
    for dataset in (splits.test, splits.val, splits.calibration):  # what the model is evaluated and calibrated on
        x, _ = dataset[0]
        path = dataset.dataset.samples[dataset.indices[0]][0] if hasattr(dataset, "indices") else dataset.samples[0][0]
        original = torch.from_numpy(np.array(Image.open(path)))
        pixels = unnormalised(x, splits)
        assert pixels.shape == (1, 32, 32)
        assert torch.equal(pixels[0, 2:30, 2:30], original)  # every pixel as it was, none resampled
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert not pixels[0][border].any()  # a 2-pixel zero border all round
    stretched = load_dataset("folder", str(tmp_path), input_size=32, fit="stretch")
    x = unnormalised(stretched.test[0][0], stretched)
    assert stretched.fit == "stretch" and x[0][:2].any()  # upsampled: the image reaches the edges


@pytest.mark.parametrize("fit", ["pad", "stretch"])
def test_larger_folder_images_keep_resize_then_centre_crop(tmp_path, fit):
    write_folder(str(tmp_path), "RGB", sizes=[(64, 48)], splits=("train", "test"))
    splits = load_dataset("folder", str(tmp_path), input_size=32, fit=fit)
    original = v2.PILToTensor()(Image.open(tmp_path / "test" / "cat" / "0.png"))
    # torchvision's own pipeline, what gateify always did for larger images: longer side to 32, centred, padded
    expected = v2.Compose([v2.Resize(size=None, max_size=32, antialias=True), v2.CenterCrop(32)])(original)
    assert torch.equal(unnormalised(splits.test[0][0], splits), expected)


def test_fit_to_size_pads_centred_or_stretches():
    image = torch.randint(1, 256, (2, 1, 5, 7), dtype=torch.uint8)
    padded = fit_to_size(image, 8, "pad")
    assert torch.equal(padded[..., 1:6, 0:7], image)  # odd difference: the extra row/column at the bottom/right
    assert padded.sum() == image.sum()
    stretched = fit_to_size(image, 8, "stretch")
    assert stretched.shape == (2, 1, 8, 8) and stretched[..., 3, [0, 7]].all()  # the longer side fills the input
    assert torch.equal(fit_to_size(image, 7, "pad"), fit_to_size(image, 7, "stretch"))  # already fills it
    with pytest.raises(DatasetError, match="unknown fit 'crop'"):
        fit_to_size(image, 8, "crop")
    with pytest.raises(DatasetError, match="unknown fit"):
        load_dataset("digits", fit="squash")


@pytest.mark.parametrize("name", ["animals-c", "digits-c"])
def test_28x28_benchmarks_are_padded_or_stretched_through_the_one_policy(name):
    padded = load_dataset(name, input_size=32, fit="pad")
    stretched = load_dataset(name, input_size=32, fit="stretch")
    assert (padded.fit, stretched.fit) == ("pad", "stretch") and padded.version == stretched.version
    inside = padded.test.images[..., 2:30, 2:30]
    assert padded.test.images.sum() == inside.sum()  # nothing but zeros in the 2-pixel border
    # the stretch arm holds the same 28x28 images, bilinearly upsampled: same content, other pixels
    assert torch.equal(fit_to_size(inside, 32, "stretch"), stretched.test.images)
    assert torch.equal(padded.test.labels, stretched.test.labels)


def test_unique_images_keeps_one_of_each_identical_group_and_drops_conflicting_labels():
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    images[3], images[5] = images[1], images[2]  # 1 = 3 (same label), 2 = 5 (different labels)
    labels = torch.tensor([0, 1, 2, 1, 4, 3])
    assert unique_images(images, labels).tolist() == [0, 1, 4]


def hashes(images):
    return [hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest() for image in images]


def assert_no_image_in_two_splits(parts):
    seen = {}
    for name, images in parts.items():
        for h in set(hashes(images)):
            assert h not in seen, f"an image of {name} is also in {seen.get(h)}"
            seen[h] = name


def test_animals_c_has_no_image_in_two_splits_before_or_after_corruption():
    source, _ = read_animals()
    assert len(set(hashes(source))) == 9716  # animal-mnist 0.4: 10,000 images, 284 identical pairs
    clean = load_dataset("animals", input_size=28)  # the same split, before corruption, at the source's 28x28
    corrupted = load_dataset("animals-c", input_size=28)
    assert (clean.version, corrupted.version) == (VERSIONS["animals"], VERSIONS["animals-c"]) == (
        "animals/2", "animals-c/2")
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(clean, split).labels, getattr(corrupted, split).labels)
    for splits in (clean, corrupted):
        assert_no_image_in_two_splits({s: getattr(splits, s).images for s in ("train", "val", "test")})
    assert [len(clean.train), len(clean.val), len(clean.test)] == [4856, 973, 3887]


def test_digits_c_has_no_image_in_two_splits_before_or_after_corruption():
    images, labels = read_digits()
    assert images.shape == (1797, 1, 28, 28) and len(set(hashes(images))) == 1797  # no duplicates in the source
    splits = load_dataset("digits-c", input_size=28)
    assert splits.version == "digits-c/1" and (len(splits.train), len(splits.val), len(splits.test)) == (898, 180, 719)
    corrupted, kind, severity = corrupt(images, seed=0, **DIGITS_C)
    lo, hi = DIGITS_C["severity"]
    assert set(severity[kind >= 0].tolist()) <= set(range(lo, hi + 1))
    parts = dict(zip(("train", "val", "test"), _stratified_split(labels, (0.5, 0.1, 0.4), seed=0)))
    for name, idx in parts.items():  # the split is the source's, index for index: before corruption too
        assert torch.equal(getattr(splits, name).images, corrupted[idx])
    assert_no_image_in_two_splits({name: images[idx] for name, idx in parts.items()})
    assert_no_image_in_two_splits({name: getattr(splits, name).images for name in parts})
    assert torch.bincount(splits.test.labels).min() >= 70  # stratified: every class ~40% in test


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
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4856, 973, 3887)
    assert splits.num_classes == 10 and splits.in_chans == 1
    # stratified: 40% of each class's unique images (birds hold most of the 284 duplicates)
    assert torch.bincount(splits.test.labels).tolist() == [375, 325, 397, 398, 399, 400, 400, 399, 394, 400]
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
