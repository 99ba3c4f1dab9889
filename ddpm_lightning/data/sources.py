"""Raw image sources: where pixels and labels come from, before any Lightning wiring.

A source has a length, ``channels``, ``num_classes`` (``None`` when unlabelled), ``labels`` (int64
``[N]`` or ``None``) known without decoding, and ``get(indices) -> uint8 [B, C, H, W]`` at the
training size. ``InMemorySource`` holds a uint8 tensor; lazy sources (image folders, CelebA) decode
files on demand.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.error import URLError

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.data.transforms import FitMethod, fit_images, fit_pil

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """What a data module needs from a source of images."""

    channels: int
    num_classes: int | None
    labels: Tensor | None
    in_memory: bool

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int] | Tensor) -> Tensor:
        """uint8 images ``[B, C, H, W]`` at the training size."""
        ...


def check_labels(labels: Tensor, num_classes: int | None, what: str, advice: str | None = None) -> None:
    """Raise ``ValueError`` unless every label is in ``[0, num_classes)``; ``advice`` ends the message (default: fix
    the labels or raise the data set's ``num_classes``)."""
    if num_classes is None:
        raise ValueError(f"{what}: labels given but num_classes is None; set num_classes")
    if num_classes < 1:
        raise ValueError(f"{what}: num_classes must be >= 1, got {num_classes}")
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise ValueError(
            f"{what}: label {bad} is out of range [0, {num_classes}) (labels span {low}..{high}); "
            + (advice or f"fix the labels or set num_classes >= {high + 1}")
        )


@dataclass
class InMemorySource:
    """uint8 images ``[N, C, H, W]`` (already at the training size) and optional int64 labels ``[N]``."""

    images: Tensor
    labels: Tensor | None = None
    num_classes: int | None = None
    what: str = "images"
    in_memory: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.what}: expected uint8 images [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(
                    f"{self.what}: {tuple(self.labels.shape)} labels for {self.images.shape[0]} images; "
                    "expected one label per image"
                )
            if self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
                raise ValueError(f"{self.what}: labels must be integers, got {self.labels.dtype}")
            self.labels = self.labels.to(torch.int64)
            check_labels(self.labels, self.num_classes, self.what)
        elif self.num_classes is not None:
            raise ValueError(f"{self.what}: num_classes={self.num_classes} but there are no labels")

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get(self, indices: Sequence[int] | Tensor) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]


# --------------------------------------------------------------------------------------- animal-mnist
# animal-mnist==0.4 ships its arrays as gzip'd pickles. Unpickling can run arbitrary code, so we only
# unpickle these two files of that pinned package version, after checking their SHA-256 against the
# digests below (computed from the installed animal-mnist 0.4 wheel), and with an unpickler that can
# only rebuild numpy arrays. The package itself is never imported (it imports tensorflow).
ANIMAL_MNIST_FILES: dict[str, str] = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
# Class order from the package's description (alphabetical); the files hold 1000 images per label 0..9.
ANIMAL_MNIST_CLASSES: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a plain numpy ndarray pickle needs."""

    def find_class(self, module: str, name: str):
        if (module, name) in {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }:
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's _reconstruct, without the deprecated path
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def animal_mnist_dir() -> Path:
    spec = importlib.util.find_spec("animal_mnist")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the animal-mnist package is not installed: pip install --no-deps animal-mnist==0.4"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def _load_verified_array(path: Path, expected_sha256: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps animal-mnist==0.4")
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {expected_sha256}: refusing to unpickle it; "
            "reinstall animal-mnist==0.4"
        )
    with gzip.open(io.BytesIO(raw), "rb") as f:
        array = _NumpyOnlyUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} does not hold a numpy array")
    return array


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 animal silhouettes: uint8 ``[10000, 28, 28]`` (black background) and int64 labels."""
    folder = animal_mnist_dir()
    names = list(ANIMAL_MNIST_FILES)
    images = _load_verified_array(folder / names[0], ANIMAL_MNIST_FILES[names[0]])
    labels = _load_verified_array(folder / names[1], ANIMAL_MNIST_FILES[names[1]])
    if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
        raise ValueError(f"unexpected animal-mnist layout {images.shape} {images.dtype} / {labels.shape}")
    return images, labels.astype(np.int64)


def animal_mnist_source(image_size: int, fit: FitMethod = "pad") -> InMemorySource:
    images, labels = load_animal_mnist()
    x = fit_images(torch.from_numpy(images).unsqueeze(1), image_size, fit)
    return InMemorySource(
        x, torch.from_numpy(labels), num_classes=len(ANIMAL_MNIST_CLASSES), what="animal_mnist"
    )


# ---------------------------------------------------------------------------------- digits and faces
def digits_source(image_size: int) -> InMemorySource:
    """scikit-learn's 1,797 8x8 digits (0-16) scaled to uint8 and resized to ``image_size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = fit_images(torch.from_numpy(images).unsqueeze(1), image_size, "resize")
    return InMemorySource(x, torch.from_numpy(bunch.target.astype(np.int64)), num_classes=10, what="digits")


def lfw_source(image_size: int) -> InMemorySource:
    """scikit-image's 200 grey 25x25 face crops (no labels), resized to ``image_size``."""
    from skimage.data import lfw_subset

    faces = lfw_subset()  # float64 in [0, 1]
    images = np.round(faces * 255.0).clip(0, 255).astype(np.uint8)
    x = fit_images(torch.from_numpy(images).unsqueeze(1), image_size, "resize")
    return InMemorySource(x, None, num_classes=None, what="lfw")


# ------------------------------------------------------------------------------------------------ npz
NPZ_HELP = "expected arr_0 = uint8 images [N, H, W, C] (C = 1 or 3) and optional arr_1 = int labels [N]"


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-style ``.npz`` (``np.savez(path, images, labels)``) without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data.path={str(path)!r} is not a file: point it at an .npz file ({NPZ_HELP})"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"cannot read {path} as an .npz archive ({err}); {NPZ_HELP}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive; {NPZ_HELP}")
    with archive:
        if "arr_0" not in archive.files:
            raise ValueError(f"{path} has arrays {archive.files} but no arr_0; {NPZ_HELP}")
        try:
            images = archive["arr_0"]
            labels = archive["arr_1"] if "arr_1" in archive.files else None
        except ValueError as err:  # object arrays need pickle: refused
            raise ValueError(f"{path} holds pickled Python objects, which are refused; {NPZ_HELP}") from err
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 has dtype {images.dtype}; {NPZ_HELP}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 has shape {images.shape}; {NPZ_HELP}")
    if labels is not None and (
        labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images)
    ):
        raise ValueError(f"{path}: arr_1 has shape {labels.shape} and dtype {labels.dtype}; {NPZ_HELP}")
    return images, labels


def npz_source(
    path: str | Path, image_size: int, num_classes: int | None = None, fit: FitMethod = "resize"
) -> InMemorySource:
    """Images (and labels) from an ``.npz``; ``num_classes=None`` with labels present means ``max + 1``."""
    images, labels = load_npz(path)
    x = fit_images(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), image_size, fit)
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    if y is not None and num_classes is None and len(y):
        num_classes = int(y.max()) + 1
        log.info("%s: num_classes inferred as %d from arr_1 (max label + 1)", path, num_classes)
    return InMemorySource(x, y, num_classes=num_classes, what=str(path))


# ---------------------------------------------------------------------------------------- torchvision
TorchvisionName = Literal["cifar10", "mnist", "celeba"]
TORCHVISION_DATASETS: dict[str, str] = {
    # name -> where torchvision expects the files under root
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
    "mnist": "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)",
    "celeba": "celeba/ (img_align_celeba/, list_eval_partition.txt, list_attr_celeba.txt, ...)",
}


def _torchvision_dataset(name: str, root: str, download: bool):
    from torchvision import datasets

    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"dataset={name!r} is not one of {tuple(TORCHVISION_DATASETS)}")
    where = f"{Path(root).resolve()}/{TORCHVISION_DATASETS[name]}"
    try:
        if name == "cifar10":
            return datasets.CIFAR10(root, train=True, download=download)
        if name == "mnist":
            return datasets.MNIST(root, train=True, download=download)
        return datasets.CelebA(root, split="train", target_type=[], download=download)
    except (URLError, OSError, RuntimeError) as err:
        if download:
            raise RuntimeError(
                f"could not download {name} into data.root={root!r} ({err}); without network, put the "
                f"files at {where} and set data.download=false"
            ) from err
        raise FileNotFoundError(
            f"{name} not found under data.root={root!r}: put the files at {where}, "
            "or set data.download=true to fetch them (needs network)"
        ) from err


def download_torchvision(name: str, root: str) -> None:
    """Fetch a torchvision data set into ``root`` (no-op when present)."""
    _torchvision_dataset(name, root, download=True)


class CelebASource:
    """CelebA training split decoded lazily from ``root/celeba/img_align_celeba`` (no labels)."""

    num_classes: int | None = None
    labels: Tensor | None = None
    in_memory = False

    def __init__(self, dataset, image_size: int, crop: int | None) -> None:
        self.dataset = dataset
        self.image_size = image_size
        self.crop = crop
        self.channels = 3

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: Sequence[int] | Tensor) -> Tensor:
        out = []
        for i in torch.as_tensor(indices).tolist():
            image = fit_pil(self.dataset[i][0].convert("RGB"), self.image_size, self.crop)
            out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        return torch.stack(out)


def torchvision_source(
    name: str, root: str, image_size: int, fit: FitMethod = "resize", crop: int | None = None
) -> InMemorySource | CelebASource:
    """CIFAR-10 / MNIST training images held in memory, or CelebA decoded lazily."""
    dataset = _torchvision_dataset(name, root, download=False)
    if name == "celeba":
        return CelebASource(dataset, image_size, crop)
    data = torch.as_tensor(np.asarray(dataset.data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    x = fit_images(images.contiguous(), image_size, fit, crop)
    return InMemorySource(x, labels, num_classes=len(dataset.classes), what=name)
