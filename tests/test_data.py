"""Data layer: embedded sets, image folders, npz, torchvision stand-ins, configs, reference images."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.data import (
    AnimalMNISTDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    LFWDataModule,
    NpzDataModule,
    TorchvisionDataModule,
    sources,
)
from ddpm_lightning.data.transforms import ToModelBatch, fit_images, random_hflip, to_model_range, to_uint8

CONF_DIR = Path(CONFIG_DIR) / "data"


@pytest.fixture(scope="module")
def animal() -> AnimalMNISTDataModule:
    dm = AnimalMNISTDataModule(batch_size=16)
    dm.setup("fit")
    return dm


def save_png(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (value, 0, 255 - value), "RGBA": (value, value, value, 0), "L": value, "P": value}[mode]
    Image.new(mode, size, color).save(path)
    return path


def class_folder(root: Path, per_class: int = 3) -> Path:
    for name, value in (("cats", 30), ("dogs", 200)):
        for i in range(per_class):
            save_png(root / name / f"{i}.png", value=value + i)
    return root


# ------------------------------------------------------------------------------------ animal-mnist
def test_animal_mnist_loads_10000_balanced_padded_images(animal):
    images, labels = animal.source.images, animal.source.labels
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8
    assert (animal.name, animal.channels, animal.num_classes, animal.image_size) == (
        "animal_mnist",
        1,
        10,
        32,
    )
    assert torch.bincount(labels).tolist() == [1000] * 10
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert images[:, :, border].max() == 0  # padded with the black background
    raw, raw_labels = sources.load_animal_mnist()
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(raw))
    assert torch.equal(labels, torch.from_numpy(raw_labels))


def test_animal_mnist_batches_and_split(animal):
    x, y = next(iter(animal.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    train, val = animal.split_indices("train"), animal.split_indices("val")
    assert len(val) == 1000 and len(train) == 9000
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(10000))
    again = AnimalMNISTDataModule(batch_size=16)
    assert torch.equal(again.split_indices("val"), val)
    assert not torch.equal(AnimalMNISTDataModule(seed=1).split_indices("val"), val)


def test_val_loader_is_ordered_and_unflipped(animal):
    x, y = next(iter(animal.val_dataloader()))
    assert torch.equal(x, to_model_range(animal.reference_images("val", 16)))
    assert torch.equal(y, animal.reference_labels("val", 16))


def test_reference_images_deterministic(animal):
    ref = animal.reference_images("train", 8)
    assert ref.dtype == torch.uint8 and ref.shape == (8, 1, 32, 32)
    assert torch.equal(ref, AnimalMNISTDataModule().reference_images("train", 8))
    assert torch.equal(animal.reference_images("train", 20)[:8], ref)
    assert animal.reference_labels("train", 8).shape == (8,)
    assert animal.reference_key("train", 8) != animal.reference_key("val", 8)
    images, labels = animal.reference_images("val"), animal.reference_labels("val")  # the whole split
    assert images.shape == (1000, 1, 32, 32) and labels.shape == (1000,)
    with pytest.raises(ValueError, match="asked for 2000 val reference images"):
        animal.reference_images("val", 2000)
    with pytest.raises(ValueError, match="split='test' is not one of"):
        animal.reference_images("test", 2)


def test_animal_mnist_refuses_tampered_files(monkeypatch):
    monkeypatch.setitem(sources.ANIMAL_MNIST_FILES, "animal_data_version_3.gz", "0" * 64)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        sources.load_animal_mnist()


def test_array_unpickler_refuses_other_objects(tmp_path):
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(OrderedDict(a=1), f)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load collections.OrderedDict"):
        sources._load_verified_array(path, digest)


def test_flip_limit_and_split_options():
    dm = AnimalMNISTDataModule(limit=100, val_size=0.2, batch_size=10)
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val)) == (80, 20)
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 1, 3, 4).repeat(64, 1, 1, 1)
    out = random_hflip(to_model_range(x))
    flipped = (out == to_model_range(x).flip(-1)).flatten(1).all(1)
    assert 0 < flipped.sum() < 128
    out, y = ToModelBatch()(dm.data_train.__getitems__([0, 1, 2]))
    assert out.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(to_uint8(out), dm.data_train.__getitems__([0, 1, 2])[0]) and y.shape == (3,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": 1.5}, "val_size must be"),
        ({"val_size": True}, "val_size must be"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"limit": 0}, "limit must be"),
        ({"fit": "stretch"}, "fit='stretch' is not one of"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnimalMNISTDataModule(**kwargs)


def test_too_small_training_split():
    with pytest.raises(ValueError, match="lower data.batch_size or data.val_size"):
        AnimalMNISTDataModule(limit=20, val_size=10, batch_size=16).setup()
    with pytest.raises(ValueError, match="leaves no training images"):
        AnimalMNISTDataModule(limit=20, val_size=20).setup()


def test_fit_pad_refuses_larger_images():
    with pytest.raises(ValueError, match="use data.fit=resize"):
        fit_images(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 4, "pad")


# ------------------------------------------------------------------------------------- digits, lfw
def test_digits_and_lfw_load():
    digits = DigitsDataModule(image_size=16, batch_size=8)
    digits.setup()
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and y.max() < 10
    assert (len(digits.source), digits.num_classes, digits.random_flip) == (1797, 10, False)
    assert digits.source.images.max() == 255  # 16 -> 255
    lfw = LFWDataModule(batch_size=8)
    lfw.setup()
    x, y = next(iter(lfw.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and lfw.num_classes is None and torch.all(y == 0)
    assert len(lfw.source) == 200 and lfw.reference_labels("train", 4) is None


# ------------------------------------------------------------------------------------ image folder
def test_image_folder_class_subfolders_become_labels(tmp_path):
    dm = ImageFolderDataModule(str(class_folder(tmp_path)), image_size=8, batch_size=2, val_size=2)
    dm.setup()
    assert (dm.channels, dm.num_classes, dm.source.class_names) == (3, 2, ["cats", "dogs"])
    assert dm.source.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    ref = dm.reference_images("val", 2)
    assert ref.shape == (2, 3, 8, 8) and ref.dtype == torch.uint8
    red = torch.tensor([30, 200])[dm.reference_labels("val", 2)]  # class colour: (30 + i, 0, 225 - i) etc.
    assert (ref[:, 0, 4, 4].int() - red).abs().max() <= 2 and ref[:, 1].max() == 0
    with pytest.raises(TypeError, match="reference_images"):
        dm.train_tensors()
    pickle.dumps(dm.data_train)  # workers need a picklable dataset


def test_image_folder_flat_is_unlabelled_and_grey_mode(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", mode="L", value=10 * i)
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, mode="L", batch_size=1, val_size=0)
    dm.setup()
    assert dm.num_classes is None and dm.channels == 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (1, 1, 4, 4) and y.tolist() == [0]
    assert dm.val_dataloader() == []


def test_corrupt_image_error_names_file_and_skip_drops_it(tmp_path, caplog):
    root = class_folder(tmp_path)
    (root / "dogs" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png.*on_bad_image=skip"):
        ImageFolderDataModule(str(root), image_size=8, val_size=0, batch_size=1).setup()
    dm = ImageFolderDataModule(str(root), image_size=8, val_size=0, batch_size=1, on_bad_image="skip")
    dm.setup()
    assert len(dm.source) == 6 and "skipped 1 unreadable image" in caplog.text


def test_truncated_image_found_at_decode_time(tmp_path, caplog):
    root = class_folder(tmp_path)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "cats" / "trunc.jpg")
    data = (root / "cats" / "trunc.jpg").read_bytes()
    (root / "cats" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    dm = ImageFolderDataModule(str(root), image_size=8, val_size=0, batch_size=1)
    index = [p.name for p in dm.source.files].index("trunc.jpg")
    with pytest.raises(ValueError, match=r"cannot decode image .*trunc\.jpg"):
        dm.source.get([index])
    skip = ImageFolderDataModule(str(root), image_size=8, val_size=0, batch_size=1, on_bad_image="skip")
    assert skip.source.get([index]).shape == (1, 3, 8, 8) and "using the next image" in caplog.text


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_in_rgb_folder_converted_or_reported(tmp_path, mode):
    root = class_folder(tmp_path)
    save_png(root / "cats" / "odd.png", mode=mode, value=90)
    dm = ImageFolderDataModule(str(root), image_size=8, val_size=0, batch_size=1, convert_mode=True)
    odd = [p.name for p in dm.source.files].index("odd.png")
    image = dm.source.get([odd])
    assert image.shape == (1, 3, 8, 8)
    if mode == "RGBA":  # fully transparent: composited onto black
        assert image.max() == 0
    with pytest.raises(ValueError, match=rf"e\.g\. .*odd\.png \(mode '{mode}'\).*convert_mode=true"):
        ImageFolderDataModule(str(root), image_size=8, batch_size=1, convert_mode=False).setup()


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # 128 * 257
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, mode="L", batch_size=1, val_size=0)
    assert dm.source.get([0]).unique().tolist() == [128]


def test_missing_empty_and_mixed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"), image_size=8).setup()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images .* found in"):
        ImageFolderDataModule(str(tmp_path / "empty"), image_size=8).setup()
    mixed = class_folder(tmp_path / "mixed")
    save_png(mixed / "top.png")
    with pytest.raises(ValueError, match="both at its top level and in sub-folders"):
        ImageFolderDataModule(str(mixed), image_size=8).setup()
    with pytest.raises(ValueError, match="mode='CMYK' is not one of"):
        ImageFolderDataModule(str(mixed), image_size=8, mode="CMYK").setup()


# --------------------------------------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 4
    np.savez(tmp_path / "batch.npz", images, labels)
    dm = NpzDataModule(str(tmp_path / "batch.npz"), image_size=8, batch_size=4, val_size=4)
    assert (dm.channels, dm.num_classes) == (3, 4)
    assert dm.name.startswith("npz-batch-")
    images_t, labels_t = dm.train_tensors()
    order = dm.split_indices("train")
    assert torch.equal(images_t, torch.from_numpy(images).permute(0, 3, 1, 2)[order])
    assert torch.equal(labels_t, torch.from_numpy(labels)[order])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
    np.savez(tmp_path / "grey.npz", images[..., 0])
    grey = NpzDataModule(str(tmp_path / "grey.npz"), image_size=16)
    assert (grey.channels, grey.num_classes) == (1, None)
    assert grey.reference_images("train", 2).shape == (2, 1, 16, 16)


def test_npz_bad_layouts_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="pickled Python objects, which are refused"):
        NpzDataModule(str(tmp_path / "objects.npz")).setup()
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 has dtype float32"):
        NpzDataModule(str(tmp_path / "float.npz")).setup()
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"arr_0 has shape \(2, 3, 4, 4\)"):
        NpzDataModule(str(tmp_path / "nchw.npz")).setup()
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no arr_0"):
        NpzDataModule(str(tmp_path / "named.npz")).setup()
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read .* as an .npz archive"):
        NpzDataModule(str(tmp_path / "junk.npz")).setup()
    with pytest.raises(FileNotFoundError, match="point it at an .npz file"):
        NpzDataModule(str(tmp_path / "missing.npz")).setup()


@pytest.mark.parametrize(("labels", "bad"), [([0, 1, 5, 2], 5), ([0, -1, 1, 2], -1)])
def test_labels_out_of_range(tmp_path, labels, bad):
    np.savez(tmp_path / "l.npz", np.zeros((4, 4, 4, 1), np.uint8), np.array(labels))
    with pytest.raises(ValueError, match=rf"label {bad} is out of range \[0, 3\)"):
        NpzDataModule(str(tmp_path / "l.npz"), num_classes=3, image_size=4).setup()


# ------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "celeba"])
def test_torchvision_missing_files_clear_error(tmp_path, dataset, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    dm = TorchvisionDataModule(dataset, root=str(tmp_path), download=False)
    dm.prepare_data()  # download=False: nothing to do
    root = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"not found under data.root=.*{root}.*data.download=true"):
        dm.setup()


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]
    path.write_bytes(
        struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    dm = TorchvisionDataModule("mnist", root=str(tmp_path), fit="pad", batch_size=4, val_size=4)
    dm.setup()
    assert (dm.name, dm.channels, dm.num_classes) == ("mnist", 1, 10)
    assert torch.equal(dm.source.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32)


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_config_instantiates(path, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    assert {"_target_", "batch_size", "num_workers", "image_size"} <= set(cfg)
    overrides = {}
    if path.stem == "image_folder":
        overrides = {"path": str(class_folder(tmp_path)), "val_size": 2, "batch_size": 2}
    elif path.stem == "npz":
        np.savez(tmp_path / "a.npz", np.zeros((6, 4, 4, 3), np.uint8), np.arange(6) % 2)
        overrides = {"path": str(tmp_path / "a.npz"), "val_size": 2, "batch_size": 2}
    dm = instantiate(OmegaConf.merge(cfg, overrides))
    assert dm.image_size == cfg.image_size and dm.batch_size == overrides.get("batch_size", cfg.batch_size)
    if isinstance(dm, TorchvisionDataModule):
        assert dm.root == "data" and dm.download is False  # network data: construction loads nothing
        return
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (dm.channels, dm.image_size, dm.image_size) and y.dtype == torch.int64


@pytest.mark.parametrize("val_size", [0, 8])
def test_trains_in_lightning(tmp_path, val_size):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.val_batches = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            return ((x - self.w) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(image_size=8, batch_size=8, limit=64, val_size=val_size)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    probe = Probe()
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == (64 - val_size) // 8
    assert probe.val_batches == (0 if val_size == 0 else 2)  # sanity check + end of epoch
    expected = {"image_size": 8, "batch_size": 8, "limit": 64, "val_size": val_size, "random_flip": False}
    assert dict(dm.hparams) == expected  # primitives only, saved into checkpoints


def test_celeba_source_crops_and_resizes_lazily():
    faces = [(Image.new("RGB", (178, 218), (i * 50, 0, 0)), None) for i in range(3)]
    source = sources.CelebASource(faces, image_size=64, crop=140)
    images = source.get([2, 0])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [100, 0] and source.labels is None
