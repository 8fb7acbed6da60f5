"""Data sets: the embedded digits, CIFAR-10/100 python-pickle archives, ImageFolder trees.

Every loader returns a :class:`DataBundle`: train and test sets of ``(image, label)`` with images as
float tensors ``(C, H, W)`` already normalised, plus the batch augmentation to use in training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import pickle
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .augment import random_crop_flip, random_translate

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


class DatasetError(ValueError):
    """A data set is missing or malformed; the message says what was expected where."""


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    #: applied to each training batch ``(x, generator) -> x`` (None: no augmentation)
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]]


def _normalise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel standardisation with the *training* statistics."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared dependency of [train]
        raise DatasetError("the digits data set ships with scikit-learn: pip install scikit-learn") from exc
    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in range(10):  # stratified: the same fraction of every class
        idx = np.flatnonzero(digits.target == c)
        test_idx += list(rng.choice(idx, size=round(len(idx) * test_fraction), replace=False))
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.tensor(sorted(test_idx))] = True
    train_x, test_x = _normalise(images[~is_test], images[is_test])
    return DataBundle(
        TensorDataset(train_x, labels[~is_test]),
        TensorDataset(test_x, labels[is_test]),
        num_classes=10,
        in_chans=1,
        image_size=8,
        augment=lambda x, g: random_translate(x, 1, g),
    )


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels": b"fine_labels",
        "classes": 100,
    },
}


@contextlib.contextmanager
def _archive_errors(root: str) -> Iterator[None]:
    """A truncated or corrupted archive as one DatasetError naming it (gzip and tar raise several kinds)."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(
            f"{root} is truncated or corrupted ({type(exc).__name__}: {exc}); download it again"
        ) from exc


def _cifar_members(root: str, spec: dict) -> Callable[[str], bytes]:
    """A reader of the archive's members, from the extracted folder or the .tar.gz itself."""
    if os.path.isfile(root) and tarfile.is_tarfile(root):
        with _archive_errors(root):
            tar = tarfile.open(root)  # noqa: SIM115  (the closure below reads members lazily)
            names = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in names:
                raise DatasetError(f"{root} has no member {name!r}; is it the python version of the archive?")
            with _archive_errors(root):
                return tar.extractfile(names[name]).read()  # type: ignore[union-attr]

        return read
    folder = root if os.path.basename(os.path.normpath(root)) == spec["folder"] else os.path.join(root, spec["folder"])
    if not os.path.isdir(folder):
        raise DatasetError(
            f"no CIFAR data at {root!r}: expected the folder {spec['folder']}/ (the extracted python-pickle "
            f"archive) or the .tar.gz archive itself"
        )

    def read(name: str) -> bytes:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DatasetError(f"CIFAR file missing: {path}")
        with open(path, "rb") as f:
            return f.read()

    return read


#: the only globals a CIFAR python batch refers to: numpy's array reconstruction (under numpy 1's and 2's
#: module names; _frombuffer for protocol 5) and the bytes codec of protocol-2 pickles; nothing else loads
_CIFAR_GLOBALS = frozenset(
    [
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    ]
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the dicts of arrays, lists and bytes a CIFAR batch holds and nothing else: a plain
    ``pickle.loads`` of a crafted batch file would run whatever callable it names."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch; refusing to load it")
        return super().find_class(module, name)


def _load_cifar_batch(raw: bytes) -> dict:
    return _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _cifar_part(read, names: list[str], label_key: bytes) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in names:
        try:
            batch = _load_cifar_batch(read(name))
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = batch[label_key]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as exc:
            raise DatasetError(f"CIFAR file {name!r} is malformed ({type(exc).__name__}: {exc})") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != data.shape[0]:
            raise DatasetError(f"CIFAR file {name!r} is malformed: data {data.shape}, {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(batch_labels)
    return torch.from_numpy(np.concatenate(images)).float() / 255.0, torch.tensor(labels, dtype=torch.long)


def load_cifar(name: str, root: str) -> DataBundle:
    """CIFAR-10/100 from the standard python-pickle archive (extracted folder or .tar.gz) at ``root``."""
    spec = _CIFAR[name]
    read = _cifar_members(root, spec)
    train_x, train_y = _cifar_part(read, spec["train"], spec["labels"])
    test_x, test_y = _cifar_part(read, spec["test"], spec["labels"])
    if int(max(train_y.max(), test_y.max())) >= spec["classes"] or int(min(train_y.min(), test_y.min())) < 0:
        raise DatasetError(f"{name} labels must lie in [0, {spec['classes']})")
    train_x, test_x = _normalise(train_x, test_x)
    return DataBundle(
        TensorDataset(train_x, train_y),
        TensorDataset(test_x, test_y),
        num_classes=spec["classes"],
        in_chans=3,
        image_size=32,
        augment=lambda x, g: random_crop_flip(x, 4, g),
    )


# ----------------------------------------------------------------------------- ImageFolder

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolder(Dataset):
    """``root/<class>/<image>`` decoded with Pillow, resized to ``image_size`` (train: random resized crop + flip)."""

    def __init__(self, root: str, image_size: int, train: bool, classes: Optional[list[str]] = None, seed: int = 0):
        if not os.path.isdir(root):
            raise DatasetError(f"no image folder at {root!r}")
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = classes if classes is not None else found
        if not self.classes:
            raise DatasetError(f"{root!r} has no class folders (expected root/<class>/<image>)")
        unknown = set(found) - set(self.classes)
        if unknown:
            raise DatasetError(f"{root!r} has class folders the training set lacks: {sorted(unknown)}")
        self.samples = [
            (os.path.join(root, c, f), i)
            for i, c in enumerate(self.classes)
            if os.path.isdir(os.path.join(root, c))
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(_IMAGE_EXTENSIONS)
        ]
        if not self.samples:
            raise DatasetError(f"{root!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
        counts = Counter(label for _, label in self.samples)
        empty = [c for i, c in enumerate(self.classes) if counts[i] == 0 and os.path.isdir(os.path.join(root, c))]
        if empty:
            raise DatasetError(f"{root!r}: class folder {empty[0]!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot decode image {path}: {exc}") from exc
        size = self.image_size
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))  # reproducible per epoch and sample
            w, h = img.size
            scale, ratio = rng.uniform(0.35, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = int(min(w, round(np.sqrt(scale * w * h * ratio))))
            ch = int(min(h, round(np.sqrt(scale * w * h / ratio))))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
        return (x - mean) / torch.tensor(_IMAGENET_STD).view(3, 1, 1), label


def load_imagefolder(root: str, image_size: int = 64, seed: int = 0) -> DataBundle:
    """An ImageNet-style tree: ``root/train/<class>/*`` and ``root/val/<class>/*``."""
    train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
    for part in (train_root, val_root):
        if not os.path.isdir(part):
            raise DatasetError(f"ImageFolder data needs {part!r} (root/train/<class>/ and root/val/<class>/)")
    train = ImageFolder(train_root, image_size, train=True, seed=seed)
    test = ImageFolder(val_root, image_size, train=False, classes=train.classes)
    return DataBundle(train, test, len(train.classes), 3, image_size, augment=None)


def without_augmentation(bundle: DataBundle) -> DataBundle:
    """The bundle training on its images as loaded: no batch augmentation, an image folder only resized."""
    train = bundle.train
    if isinstance(train, ImageFolder) and train.train:
        train = copy.copy(train)
        train.train = False  # its random resized crops and flips happen as it reads
    return dataclasses.replace(bundle, train=train, augment=None)


def subsample_training(bundle: DataBundle, size: int, seed: int = 0) -> DataBundle:
    """The bundle with ``size`` training images, the same fraction of every class (a harder setting from
    the same data; the test set is kept whole). The subset depends on ``seed`` only, not on the run's seed."""
    if not isinstance(bundle.train, TensorDataset):
        raise DatasetError("--train-size takes a subset of in-memory data sets (digits, CIFAR), not image folders")
    images, labels = bundle.train.tensors
    if not bundle.num_classes <= size <= len(labels):
        raise DatasetError(f"--train-size must lie in [{bundle.num_classes}, {len(labels)}], got {size}")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(bundle.num_classes):
        idx = np.flatnonzero(labels.numpy() == c)
        take = max(1, round(len(idx) * size / len(labels)))
        keep += list(rng.choice(idx, size=min(take, len(idx)), replace=False))
    chosen = torch.tensor(sorted(keep))
    return dataclasses.replace(bundle, train=TensorDataset(images[chosen], labels[chosen]))


def load_dataset(name: str, root: Optional[str] = None, image_size: Optional[int] = None, seed: int = 0) -> DataBundle:
    """Load a data set by name: ``digits`` (embedded), ``cifar10``/``cifar100``/``imagefolder`` (need ``root``)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if image_size is not None and image_size < 1:
        raise DatasetError(f"--image-size must be a positive number of pixels, got {image_size}")
    if name == "digits":
        if root or image_size:
            raise DatasetError("digits is embedded, 8x8: --data-root and --image-size do not apply to it")
        return load_digits()
    if image_size and name != "imagefolder":
        raise DatasetError(f"{name} images are 32x32: --image-size applies to imagefolder only")
    if not root:
        raise DatasetError(f"data set {name!r} needs --data-root (a local path; nothing is downloaded)")
    if name == "imagefolder":
        return load_imagefolder(root, image_size or 64, seed)
    return load_cifar(name, root)
