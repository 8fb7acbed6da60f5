"""Data loaders on small archives written here in the real formats, and their errors."""

import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from helpers import write_image_folder

from pnnh_kernels.train.data import DatasetError, ImageFolder, load_dataset, load_digits, without_augmentation


def _write_cifar(root, name="cifar10", per_batch=6, corrupt=None):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key, classes = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            b"labels",
            10,
        )
    else:
        folder, files, key, classes = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    path = os.path.join(root, folder)
    os.makedirs(path)
    for f in files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"data": data, key: rng.integers(0, classes, per_batch).tolist(), b"batch_label": f.encode()}
        if corrupt == f:
            batch[b"data"] = data[:, :100]
        with open(os.path.join(path, f), "wb") as fh:
            pickle.dump(batch, fh)
    return path


def test_digits_is_a_fixed_stratified_split():
    a, b = load_digits(), load_digits()
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359  # 20% of each class, rounded
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of each class
    x = a.train.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-2


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_folder_and_tarball(tmp_path, name):
    folder = _write_cifar(str(tmp_path), name)
    bundle = load_dataset(name, str(tmp_path))
    train_count = 30 if name == "cifar10" else 6
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (
        train_count,
        6,
        10 if name == "cifar10" else 100,
    )
    assert bundle.train[0][0].shape == (3, 32, 32)
    tar_path = tmp_path / "archive.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    from_tar = load_dataset(name, str(tar_path))
    assert torch.equal(from_tar.train.tensors[0], bundle.train.tensors[0])
    g = torch.Generator().manual_seed(0)
    assert bundle.augment(bundle.train.tensors[0][:4], g).shape == (4, 3, 32, 32)


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-root"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="expected the folder cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    _write_cifar(str(tmp_path), corrupt="data_batch_3")
    with pytest.raises(DatasetError, match=r"data_batch_3.*malformed"):
        load_dataset("cifar10", str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DatasetError, match=r"malformed|missing"):
        load_dataset("cifar10", str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match=r"data_batch_3.*malformed"):
        load_dataset("cifar10", str(tmp_path))


class _Exploit:
    """What a crafted batch file holds: unpickling it calls os.system (here, one that writes a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_is_refused_without_running_it(tmp_path):
    _write_cifar(str(tmp_path))
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Exploit(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"data_batch_2.*posix\.system is not part of a CIFAR batch"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_cifar_batches_in_every_pickle_protocol_load(tmp_path):
    """numpy arrays pickled by protocols 2 (bytes through _codecs, as the published archive) to 5."""
    path = _write_cifar(str(tmp_path))
    expected = load_dataset("cifar10", str(tmp_path)).train.tensors[0]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        for f in os.listdir(path):
            with open(os.path.join(path, f), "rb") as fh:
                batch = pickle.load(fh)
            with open(os.path.join(path, f), "wb") as fh:
                pickle.dump(batch, fh, protocol=protocol)
        assert torch.equal(load_dataset("cifar10", str(tmp_path)).train.tensors[0], expected), protocol


def test_options_a_data_set_would_ignore_are_refused(tmp_path):
    for args, match in (
        (("digits", str(tmp_path)), "do not apply"),
        (("digits", None, 16), "do not apply"),
        (("cifar10", str(tmp_path), 64), "imagefolder only"),
        (("imagefolder", str(tmp_path), 0), "positive number of pixels"),
    ):
        with pytest.raises(DatasetError, match=match):
            load_dataset(*args)


def test_imagefolder(tmp_path):
    write_image_folder(str(tmp_path))
    bundle = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (6, 6, 2)
    x, y = bundle.train[4]
    assert x.shape == (3, 16, 16) and y == 1
    assert torch.equal(bundle.train[4][0], x)  # augmentation is reproducible per (epoch, sample)
    bundle.train.epoch = 1
    assert not torch.equal(bundle.train[4][0], x)


def test_without_augmentation_an_image_folder_reads_its_training_images_as_the_test_set_does(tmp_path):
    write_image_folder(str(tmp_path))
    bundle = without_augmentation(load_dataset("imagefolder", str(tmp_path), image_size=16))
    plain = ImageFolder(str(tmp_path / "train"), 16, train=False)
    for epoch in (0, 1):
        bundle.train.epoch = epoch
        assert torch.equal(bundle.train[4][0], plain[4][0])
    assert bundle.augment is None and load_dataset("digits").augment is not None


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"needs .*train"):
        load_dataset("imagefolder", str(tmp_path))
    write_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "val" / "bird")
    with pytest.raises(DatasetError, match="class folders the training set lacks: \\['bird'\\]"):
        load_dataset("imagefolder", str(tmp_path))
    os.rmdir(tmp_path / "val" / "bird")
    with open(tmp_path / "train" / "cat" / "0.png", "wb") as f:
        f.write(b"broken")
    bundle = load_dataset("imagefolder", str(tmp_path), image_size=8)
    with pytest.raises(DatasetError, match=r"cannot decode image .*0.png"):
        bundle.train[0]


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown data set 'mnist'"):
        load_dataset("mnist")


def test_train_size_keeps_every_class_in_proportion_and_the_test_set_whole():
    from pnnh_kernels.train.data import load_digits, subsample_training

    full = load_digits()
    small = subsample_training(full, 300)
    labels = small.train.tensors[1]
    assert abs(len(labels) - 300) <= 10 and len(small.test) == len(full.test)
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 25 and counts.max() <= 35  # ~30 of each of the 10 classes
    again = subsample_training(full, 300)
    assert torch.equal(again.train.tensors[0], small.train.tensors[0])  # the subset is fixed
    with pytest.raises(DatasetError, match=r"--train-size must lie in \[10, 1438\]"):
        subsample_training(full, 5)


def test_an_empty_class_folder_is_refused(tmp_path):
    """It would have been a class with no images: trained on silently, never predicted."""
    write_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "train" / "bird")
    with pytest.raises(DatasetError, match="class folder 'bird' holds no images"):
        load_dataset("imagefolder", str(tmp_path))


@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9])
def test_a_truncated_cifar_archive_is_one_error_naming_it(tmp_path, kept):
    """A download cut short fails inside gzip or tar, at listing or at reading a member: a traceback before."""
    folder = _write_cifar(str(tmp_path / "data"), "cifar10")
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(DatasetError, match=r"cut\.tar\.gz is truncated or corrupted"):
        load_dataset("cifar10", str(cut))
