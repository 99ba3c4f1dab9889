"""LightningDataModules for diffusion: a base owning the split and loaders, one subclass per source."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from ddpm_lightning.data.dataset import ImageSubset
from ddpm_lightning.data.image_folder import ImageFolderSource, ImageMode, OnBadImage
from ddpm_lightning.data.sampler import ResumableShuffleSampler
from ddpm_lightning.data.sources import (
    ANIMAL_MNIST_CLASSES,
    TORCHVISION_DATASETS,
    ImageSource,
    TorchvisionName,
    animal_mnist_source,
    digits_source,
    download_torchvision,
    lfw_source,
    npz_source,
    torchvision_source,
)
from ddpm_lightning.data.transforms import FIT_METHODS, FitMethod, ToModelBatch, random_hflip

from ..seeding import derive_seed

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = ("train", "val")


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _path_name(kind: str, path: str | Path) -> str:
    resolved = Path(path).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return f"{kind}-{resolved.stem or 'root'}-{digest}"


class DiffusionDataModule(LightningDataModule):
    """Images for diffusion training, split into a training and a held-out validation set.

    Subclasses only say where the images come from (``load_source``); this class owns the seeded
    split, the loaders and the reference images used for metrics.

    Attributes the training and metrics code rely on:
        name (str): stable data set key for caches of reference statistics, e.g. ``"animal_mnist"``.
        image_size (int): images are ``image_size x image_size``.
        channels (int): 1 (grey) or 3 (RGB).
        num_classes (int | None): number of classes; ``None`` for unlabelled data.
        batch_size, val_batch_size, num_workers (int): loader settings.
        ``channels`` and ``num_classes`` load the source on first access (cheap for the built-ins).

    Batches from both loaders are tuples ``(x, y)``: ``x`` float32 ``[B, C, H, W]`` in ``[-1, 1]``
    (``uint8 / 127.5 - 1``), ``y`` int64 ``[B]``. For unlabelled data (``num_classes is None``) ``y``
    is all zeros and must not be fed to a class-conditional model. The training loader shuffles,
    drops the last partial batch and flips left-right when ``random_flip``; the validation loader
    does neither.

    Args:
        image_size: side of the square training images.
        batch_size: training batch size (``val_batch_size`` defaults to it).
        num_workers: DataLoader worker processes (0: load in the main process; in-memory sets need
            no workers).
        val_size: held-out images, a count (int) or a fraction of the images (float in [0, 1)).
        random_flip: random horizontal flips of training batches.
        seed: seed of the permutation that defines the optional ``limit`` subset, the split and the
            order of reference images; independent of the training seed.
        limit: keep only this many images (a seeded random subset), for quick runs and tests.
        pin_memory: DataLoader ``pin_memory``.
    """

    def __init__(
        self,
        *,
        name: str,
        image_size: int,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        random_flip: bool = True,
        seed: int = 0,
        limit: int | None = None,
        val_batch_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.image_size = _positive_int(image_size, "image_size")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.val_batch_size = (
            self.batch_size if val_batch_size is None else _positive_int(val_batch_size, "val_batch_size")
        )
        self.num_workers = _positive_int(num_workers, "num_workers", minimum=0)
        if isinstance(val_size, bool) or not (
            (isinstance(val_size, int) and val_size >= 0)
            or (isinstance(val_size, float) and 0 <= val_size < 1)
        ):
            raise ValueError(f"val_size must be a count >= 0 or a fraction in [0, 1), got {val_size!r}")
        self.val_size = val_size
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.limit = None if limit is None else _positive_int(limit, "limit")
        self.pin_memory = bool(pin_memory)
        self._source: ImageSource | None = None
        self._splits: dict[str, Tensor] | None = None
        self.data_train: ImageSubset | None = None
        self.data_val: ImageSubset | None = None
        self._restored_layout: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- the source
    def load_source(self) -> ImageSource:
        """Build the image source (images at ``image_size``); called once, lazily."""
        raise NotImplementedError

    @property
    def source(self) -> ImageSource:
        if self._source is None:
            self._source = self.load_source()
        return self._source

    @property
    def channels(self) -> int:
        return int(self.source.channels)

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Each class's name where the data set names them (the source's ``class_names``: an image folder's
        subfolders; animal_mnist's animals, digits' digits), else None: captions then say ``class k``."""
        names = getattr(self.source, "class_names", None)
        if names is None or self.num_classes is None or len(names) != self.num_classes:
            return None
        return tuple(str(name) for name in names)

    # -------------------------------------------------------------------------------------- the split
    def split_indices(self, split: Split) -> Tensor:
        """Source indices of ``split`` in their seeded order (the order of ``reference_images``)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if self._splits is None:
            n = len(self.source)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            if self.limit is not None:
                order = order[: self.limit]
            n_val = self.val_size if isinstance(self.val_size, int) else round(self.val_size * len(order))
            if n_val >= len(order):
                raise ValueError(
                    f"val_size={self.val_size} leaves no training images out of {len(order)}: "
                    "lower data.val_size"
                )
            self._splits = {"val": order[:n_val], "train": order[n_val:]}
        return self._splits[split]

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        train, val = self.split_indices("train"), self.split_indices("val")
        if len(train) < self.batch_size:
            raise ValueError(
                f"{self.name}: the training split has {len(train)} images, fewer than batch_size="
                f"{self.batch_size} (the last partial batch is dropped): "
                "lower data.batch_size or data.val_size"
            )
        self.data_train = ImageSubset(self.source, train)
        self.data_val = ImageSubset(self.source, val)
        log.info(
            "%s: %d training / %d validation images, %d channel(s), %d px, classes: %s",
            self.name, len(train), len(val), self.channels, self.image_size, self.num_classes,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: ImageSubset, train: bool, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            sampler=sampler,
            # its own generator: creating the iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=ToModelBatch(),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled by (training seed, epoch) and split over the DDP ranks (``ResumableShuffleSampler``);
        after a restore it starts where the checkpoint stopped.

        Resuming needs the same global batch (``batch_size`` x processes) as the run that wrote the checkpoint;
        the split over processes may differ (e.g. 2 x 8 -> 4 x 4): the same images are trained in the same
        steps, with other per-rank random draws. A different global batch stops with one error line.
        """
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_seed = torch.initial_seed()
        sampler = ResumableShuffleSampler(len(self.data_train), seed=self._train_seed, num_replicas=world,
                                          rank=rank, batch_size=self.batch_size)
        if len(sampler) == 0:
            raise ValueError(
                f"{self.name}: the training split has {len(self.data_train)} images, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world} processes): lower data.batch_size or data.val_size"
            )
        if trainer is not None and trainer.global_step > 0:
            sampler.resume_at(*self._resume_position(trainer, sampler))
        return self._loader(self.data_train, train=True, sampler=sampler)

    def _resume_position(self, trainer, sampler: ResumableShuffleSampler) -> tuple[int, int]:
        """(epoch, items consumed by all ranks in it) of the restored training loop."""
        saved = self._restored_layout or {"world_size": trainer.world_size, "batch_size": self.batch_size}
        saved_global = int(saved["world_size"]) * int(saved["batch_size"])
        if saved_global != sampler.global_batch:
            raise ValueError(
                f"the checkpoint was trained with a global batch of {saved_global} (data.batch_size="
                f"{saved['batch_size']} x {saved['world_size']} processes), this run has {sampler.global_batch} "
                f"(data.batch_size={self.batch_size} x {trainer.world_size}): resume with data.batch_size="
                f"{saved_global // trainer.world_size if saved_global % trainer.world_size == 0 else '?'} for "
                f"{trainer.world_size} processes (the same global batch), or start a new run folder"
            )
        fit_loop = trainer.fit_loop
        epoch = fit_loop.epoch_progress.current.completed  # Lightning's current_epoch
        batches = fit_loop.epoch_loop.batch_progress.current.processed
        if batches * self.batch_size >= len(sampler):  # saved at the end of an epoch: Lightning starts the next
            return epoch + 1, 0
        return epoch, batches * sampler.global_batch

    @override
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the layout of the global batch, checked when resuming."""
        trainer = getattr(self, "trainer", None)
        return {"world_size": trainer.world_size if trainer is not None else 1, "batch_size": self.batch_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_layout = dict(state_dict)

    @override
    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Random flips of training batches, drawn from a stream of (training seed, rank, epoch, batch): each
        rank flips its own way, and a resumed run flips as an uninterrupted one."""
        trainer = getattr(self, "trainer", None)
        if self.random_flip and trainer is not None and trainer.training:
            x, y = batch
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # this batch (its progress is counted next)
            seed = derive_seed(getattr(self, "_train_seed", 0), "flip", trainer.global_rank, trainer.current_epoch,
                               batch_idx)
            return random_hflip(x, generator=torch.Generator().manual_seed(seed)), y
        return batch

    @override
    def val_dataloader(self) -> DataLoader | list:
        """The held-out split (no flips, fixed order); an empty list when ``val_size`` is 0."""
        self.setup("validate")
        return self._loader(self.data_val, train=False) if len(self.data_val) else []

    # ------------------------------------------------------------------------------ reference images
    def _reference_indices(self, split: Split, n: int | None) -> Tensor:
        indices = self.split_indices(split)
        if n is not None:
            if _positive_int(n, "n", minimum=0) > len(indices):
                raise ValueError(
                    f"asked for {n} {split} reference images but the {split} split has {len(indices)}"
                )
            indices = indices[:n]
        return indices

    def reference_images(self, split: Split = "train", n: int | None = None) -> Tensor:
        """The first ``n`` (default: all) images of ``split`` in its seeded order, uint8 ``[N, C, H, W]``.

        Deterministic for a given ``seed``, ``limit`` and ``val_size``: use with ``reference_key`` for
        cached FID statistics. Lazy sources decode the images (ask for a bounded ``n``).
        """
        indices = self._reference_indices(split, n)
        if len(indices) == 0:
            return torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        return self.source.get(indices)

    def reference_labels(self, split: Split = "train", n: int | None = None) -> Tensor | None:
        """int64 labels matching ``reference_images(split, n)``; ``None`` for unlabelled data."""
        indices = self._reference_indices(split, n)
        labels = self.source.labels
        return None if labels is None else labels[indices]

    def reference_key(self, split: Split = "train", n: int | None = None) -> str:
        """A string that changes whenever ``reference_images(split, n)`` would: a cache key."""
        count = len(self._reference_indices(split, n))
        return (
            f"{self.name}-{self.image_size}px-{self.channels}ch-{split}{count}"
            f"-seed{self.seed}-val{self.val_size}-limit{self.limit}"
        )

    def train_tensors(self) -> tuple[Tensor, Tensor | None]:
        """All training images (uint8 ``[N, C, H, W]``) and labels (``None`` if unlabelled).

        Only for sources held in memory (``TypeError`` otherwise).
        """
        if not self.source.in_memory:
            raise TypeError(
                f"{self.name} is decoded from files, not held in memory; use reference_images(split, n) "
                "with a bounded n instead"
            )
        return self.reference_images("train"), self.reference_labels("train")


class AnimalMNISTDataModule(DiffusionDataModule):
    """The embedded default: 10,000 animal silhouettes (28x28, 1 channel, 10 classes x 1000).

    Shipped by the ``animal-mnist`` package (read from its files, never imported). ``fit="pad"``
    pads with the black background to ``image_size`` (32 by default); ``fit="resize"`` rescales.
    Class names: ``sources.ANIMAL_MNIST_CLASSES``.
    """

    def __init__(
        self,
        image_size: int = 32,
        fit: FitMethod = "pad",
        *,
        val_size: int | float = 1000,
        random_flip: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name="animal_mnist", image_size=image_size, val_size=val_size, random_flip=random_flip, **kwargs
        )
        if fit not in FIT_METHODS:
            raise ValueError(f"fit={fit!r} is not one of {FIT_METHODS}")
        self.fit = fit
        self.save_hyperparameters()

    @override
    def load_source(self) -> ImageSource:
        return animal_mnist_source(self.image_size, self.fit)

    @property
    @override
    def class_names(self) -> tuple[str, ...]:
        return ANIMAL_MNIST_CLASSES


class DigitsDataModule(DiffusionDataModule):
    """scikit-learn's 1,797 handwritten digits (8x8, 1 channel, 10 classes) resized to ``image_size``.

    No flips by default (mirrored digits are not digits).
    """

    def __init__(
        self, image_size: int = 32, *, val_size: int | float = 0.1, random_flip: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(
            name="digits", image_size=image_size, val_size=val_size, random_flip=random_flip, **kwargs
        )
        self.save_hyperparameters()

    @override
    def load_source(self) -> ImageSource:
        return digits_source(self.image_size)

    @property
    @override
    def class_names(self) -> tuple[str, ...]:
        return tuple(str(digit) for digit in range(10))


class LFWDataModule(DiffusionDataModule):
    """scikit-image's 200 grey face crops (25x25, 1 channel, unlabelled) resized to ``image_size``."""

    def __init__(
        self, image_size: int = 32, *, val_size: int | float = 0.1, random_flip: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(
            name="lfw", image_size=image_size, val_size=val_size, random_flip=random_flip, **kwargs
        )
        self.save_hyperparameters()

    @override
    def load_source(self) -> ImageSource:
        return lfw_source(self.image_size)


class ImageFolderDataModule(DiffusionDataModule):
    """A folder of images, decoded lazily with PIL: class sub-folders (sorted names) become labels,
    a flat folder is unlabelled.

    Args:
        path: the folder.
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel).
        convert_mode: convert images in another mode (grey, palette, RGBA composited on black);
            when false such images are reported as an error naming the file and its mode.
        on_bad_image: ``"error"`` (name the unreadable file) or ``"skip"`` (drop it, one warning).
        center_crop: cut a central square of this many pixels before resizing (default: the largest).
        name: cache key; default ``"folder-<folder name>-<hash of the absolute path>"``.
        **kwargs: ``DiffusionDataModule`` arguments.
    """

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        mode: ImageMode = "RGB",
        convert_mode: bool = True,
        on_bad_image: OnBadImage = "error",
        center_crop: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name or _path_name("folder", path), image_size=image_size, **kwargs)
        self.path = str(path)
        self.mode = mode
        self.convert_mode = convert_mode
        self.on_bad_image = on_bad_image
        self.center_crop = center_crop
        self.save_hyperparameters()

    @override
    def load_source(self) -> ImageSource:
        return ImageFolderSource(
            self.path, self.image_size, self.mode, self.on_bad_image, self.convert_mode, self.center_crop
        )


class NpzDataModule(DiffusionDataModule):
    """Images from an ``.npz`` in ADM's layout: ``arr_0`` uint8 ``[N, H, W, C]``, optional ``arr_1`` labels.

    Loaded with ``allow_pickle=False``. ``num_classes=None`` with labels present means ``max label + 1``
    (logged); give it explicitly when some classes may be absent.
    """

    def __init__(
        self,
        path: str,
        image_size: int = 32,
        num_classes: int | None = None,
        fit: FitMethod = "resize",
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name or _path_name("npz", path), image_size=image_size, **kwargs)
        if fit not in FIT_METHODS:
            raise ValueError(f"fit={fit!r} is not one of {FIT_METHODS}")
        self.path = str(path)
        self.requested_num_classes = num_classes
        self.fit = fit
        self.save_hyperparameters()

    @override
    def load_source(self) -> ImageSource:
        return npz_source(self.path, self.image_size, self.requested_num_classes, self.fit)


class TorchvisionDataModule(DiffusionDataModule):
    """torchvision's CIFAR-10, MNIST (training splits, held in memory) or CelebA (decoded lazily).

    Files live under ``root`` as torchvision lays them out; ``download=True`` fetches them in
    ``prepare_data`` (needs network). Without the files and with ``download=False`` the error says
    where to put them.

    Args:
        dataset: ``"cifar10"``, ``"mnist"`` or ``"celeba"`` (unlabelled: its targets are attributes).
        root: folder holding torchvision's data folders.
        download: fetch missing files in ``prepare_data``.
        fit: ``"pad"`` (e.g. MNIST 28 -> 32 with black) or ``"resize"``.
        center_crop: central square cut before resizing (140 is the CelebA 64x64 convention).
    """

    def __init__(
        self,
        dataset: TorchvisionName,
        root: str = "data",
        download: bool = False,
        image_size: int = 32,
        fit: FitMethod = "resize",
        center_crop: int | None = None,
        **kwargs: Any,
    ) -> None:
        if dataset not in TORCHVISION_DATASETS:
            raise ValueError(f"dataset={dataset!r} is not one of {tuple(TORCHVISION_DATASETS)}")
        if fit not in FIT_METHODS:
            raise ValueError(f"fit={fit!r} is not one of {FIT_METHODS}")
        super().__init__(name=dataset, image_size=image_size, **kwargs)
        self.dataset = dataset
        self.root = str(root)
        self.download = bool(download)
        self.fit = fit
        self.center_crop = center_crop
        self.save_hyperparameters()

    @override
    def prepare_data(self) -> None:
        if self.download:
            download_torchvision(self.dataset, self.root)

    @override
    def load_source(self) -> ImageSource:
        return torchvision_source(self.dataset, self.root, self.image_size, self.fit, self.center_crop)
