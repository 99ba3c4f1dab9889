"""A folder of image files as a lazily decoded source.

Layout: either images directly in the folder (unlabelled) or one sub-folder per class (labels are the
sorted sub-folder names' positions). Files are scanned once (headers only) when the source is built,
so unreadable files and wrong colour modes are reported before training starts; pixels are decoded
with PIL on demand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddpm_lightning.data.transforms import fit_pil

from ..config.choices import IMAGE_MODES, ON_BAD_IMAGE
from ..config.choices import IMAGE_SUFFIXES as IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

ImageMode = Literal["RGB", "L"]
OnBadImage = Literal["error", "skip"]
LAYOUT_HELP = "put images in it directly (unlabelled) or in one sub-folder per class"


def _is_image(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if _is_image(Path(f))]
    return found


def _raise(err: OSError) -> None:
    raise err


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """``(files, labels, class_names)``; labels and class names are ``None`` for a flat folder."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data.path={str(root)!r} does not exist: create it and {LAYOUT_HELP}")
    if not root.is_dir():
        raise NotADirectoryError(f"data.path={str(root)!r} is not a folder: point it at a folder of images")
    try:
        with os.scandir(root) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        top_files = [Path(e.path) for e in entries if e.is_file() and _is_image(e)]
        class_dirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
        per_class = [_images_under(d) for d in class_dirs] if not top_files else []
    except OSError as err:
        raise ValueError(
            f"cannot read folder {str(root)!r} ({err}): check that it exists and is readable"
        ) from err

    if top_files:
        labelled = [d for d in class_dirs if _images_under(d)]
        if labelled:
            raise ValueError(
                f"{root} has images both at its top level and in sub-folders ({labelled[0].name}/, ...): "
                "move the top-level images into class sub-folders, or the sub-folders out, to pick one layout"
            )
        return top_files, None, None
    kept = [(d, files) for d, files in zip(class_dirs, per_class, strict=True) if files]
    if not kept:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}: {LAYOUT_HELP}")
    empty = [d.name for d, files in zip(class_dirs, per_class, strict=True) if not files]
    if empty:
        log.warning("%s: ignoring %d sub-folder(s) without images: %s", root, len(empty), ", ".join(empty))
    files = [f for _, fs in kept for f in fs]
    labels = [i for i, (_, fs) in enumerate(kept) for _ in fs]
    return files, labels, [d.name for d, _ in kept]


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; transparent pixels are composited onto black (the background value).

    16-bit grey images (PIL modes ``I;16*``, or ``I`` with values above 255) are scaled to 8 bits
    rather than clipped, which is what PIL's own conversion does.
    """
    if image.mode == mode:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.round(values).clip(0, 255).astype(np.uint8), mode="L")
        return image.convert(mode)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert(mode)
    return image.convert(mode)


class ImageFolderSource:
    """Lazily decoded image folder; ``get`` returns uint8 ``[B, C, H, W]`` at ``image_size``.

    ``mode`` is the colour mode images are decoded to (``"RGB"``: 3 channels, ``"L"``: 1). Files in
    another mode (grey, palette or RGBA in an RGB folder) are converted when ``convert_mode`` and
    reported as an error otherwise. Unreadable files raise (``on_bad_image="error"``) or are dropped
    with one warning (``"skip"``).
    """

    in_memory = False

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        mode: ImageMode = "RGB",
        on_bad_image: OnBadImage = "error",
        convert_mode: bool = True,
        crop: int | None = None,
    ) -> None:
        if mode not in IMAGE_MODES:
            raise ValueError(f"mode={mode!r} is not one of {IMAGE_MODES}")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image={on_bad_image!r} is not one of {ON_BAD_IMAGE}")
        self.root = Path(root)
        self.image_size = image_size
        self.mode = mode
        self.on_bad_image = on_bad_image
        self.convert_mode = convert_mode
        self.crop = crop
        self.channels = 3 if mode == "RGB" else 1
        files, labels, self.class_names = scan_image_folder(self.root)
        self.files, labels = self._check_files(files, labels)
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.num_classes = None if self.class_names is None else len(self.class_names)

    def _check_files(
        self, files: list[Path], labels: list[int] | None
    ) -> tuple[list[Path], list[int] | None]:
        good, bad, other_mode = [], [], []
        for i, path in enumerate(files):
            try:
                with Image.open(path) as image:
                    image_mode = image.mode
                    image.verify()  # structure and checksums, without decoding the pixels
            except Exception as err:  # PIL raises many types for broken files
                if self.on_bad_image == "error":
                    raise ValueError(
                        f"cannot read image {path} ({type(err).__name__}: {err}); remove it or set "
                        "data.on_bad_image=skip"
                    ) from err
                bad.append(path)
                continue
            if image_mode != self.mode:
                other_mode.append((path, image_mode))
            good.append(i)
        if other_mode and not self.convert_mode:
            path, image_mode = other_mode[0]
            raise ValueError(
                f"{len(other_mode)} image(s) in {self.root} are not {self.mode}, e.g. {path} (mode "
                f"{image_mode!r}): set data.convert_mode=true to convert them, or data.mode to match"
            )
        if bad:
            log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), self.root, bad[0])
        if not good:
            raise ValueError(f"no readable images in {self.root}: {LAYOUT_HELP}")
        return [files[i] for i in good], None if labels is None else [labels[i] for i in good]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """Decode one image to uint8 ``[C, H, W]``."""
        path = self.files[index]
        with Image.open(path) as image:
            image.load()
            image = fit_pil(convert_image(image, self.mode), self.image_size, self.crop)
        array = np.asarray(image)
        return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)

    def get(self, indices: Sequence[int] | Tensor) -> Tensor:
        out = []
        for index in torch.as_tensor(indices).tolist():
            try:
                out.append(self.load(index))
            except Exception as err:  # a file that passed the scan but fails to decode (e.g. truncated)
                if self.on_bad_image == "error":
                    raise ValueError(
                        f"cannot decode image {self.files[index]} ({type(err).__name__}: {err}); remove it "
                        "or set data.on_bad_image=skip"
                    ) from err
                log.warning("cannot decode %s (%s); using the next image instead", self.files[index], err)
                out.append(self._next_good(index))
        return torch.stack(out)

    def _next_good(self, index: int) -> Tensor:
        for step in range(1, len(self.files)):
            try:
                return self.load((index + step) % len(self.files))
            except Exception:  # keep looking for a decodable file
                continue
        raise ValueError(f"no image in {self.root} can be decoded")
