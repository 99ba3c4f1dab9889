"""Every command of docs/scaling.md's evaluation section runs as written, at small size.

Each command is read from the document; the only changes are tiny overrides appended (Hydra keeps the last
value of a key; the converter lets flags after a preset override it) and the stand-ins for the files a
researcher would have (a checkpoint, OpenAI's reference batch, official weights, an image folder).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_config import TINY, compose_run

from ddpm_lightning.cli.convert_adm import main as convert
from ddpm_lightning.cli.evaluate import evaluate
from ddpm_lightning.cli.sample import sample
from ddpm_lightning.cli.train import train
from ddpm_lightning.metrics import load_feature_extractor, reference_stats, write_adm_reference
from ddpm_lightning.models import EncoderUNet, UNet, adm_model_config, to_adm_state_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
SECTION = "## 5. Evaluation at paper scale"
TINY_SAMPLE = ["num_samples=4", "steps=2", "devices=1", "device=cpu", "shard_size=2", "batch_size=2"]
TINY_EVAL = [*TINY_SAMPLE, "feature=tiny", "reference_n=20", "pr_reference_n=10", "classifier_epochs=1"]
# after --preset: the published architecture at a tiny width (image size, attention order etc. as the preset)
TINY_UNET_FLAGS = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                   "--attention_resolutions", "32", "--num_head_channels", "32"]
TINY_CLASSIFIER_FLAGS = ["--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions",
                         "32", "--config", "channel_mult=[1,2]"]


def section_commands() -> list[list[str]]:
    text = DOC.read_text()
    body = text[text.index(SECTION):]
    body = body[: body.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _stand_ins(root: Path, ckpt: Path) -> dict[str, str]:
    """The files the commands name, made tiny; returns {text in the document: its stand-in}."""
    unet = UNet(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                attention_resolutions=(32,), channel_mult=(1, 2), num_classes=1000, num_head_channels=32,
                use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True)
    torch.save(to_adm_state_dict(_randomize(unet)), root / "64x64_diffusion.pt")
    config = adm_model_config("classifier", {"image_size": 64, "classifier_depth": 1})
    config.update(model_channels=32, attention_resolutions=[32], channel_mult=[1, 2])
    torch.save(to_adm_state_dict(_randomize(EncoderUNet(**config))), root / "64x64_classifier.pt")
    images = root / "imagenet64_train"
    rng = np.random.default_rng(0)
    for c in range(2):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 128, (20, 20, 3)) + 127 * c
            Image.fromarray(pixels.astype(np.uint8)).save(images / f"class{c}" / f"{i}.png")
    # OpenAI's reference batch: statistics + arr_0 in their layout (here of random images, tiny features)
    real = torch.from_numpy(rng.integers(0, 256, (24, 3, 16, 16)).astype(np.uint8))
    stats = reference_stats(real, data_name="virtual", split="train", image_size=16, n=24, cache_dir=root / "c",
                            feature_extractor=load_feature_extractor("tiny"))
    write_adm_reference(root / "VIRTUAL_imagenet64_labeled.npz", stats, real, 12, 16)
    return {"multirun/imagenet64/adm/0/checkpoints/last.ckpt": str(ckpt), "/datasets/imagenet64/train": str(images),
            "outputs/eval/<time>/samples.npz": "outputs/eval/0/samples.npz"}


def _substitute(arg: str, stand_ins: dict[str, str]) -> str:
    for text, stand_in in stand_ins.items():
        arg = arg.replace(text, stand_in)
    return arg


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "model.class_cond=true"], out))
    return out / "checkpoints" / "last.ckpt"


def test_evaluation_section_commands_run_at_small_size(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    stand_ins = _stand_ins(tmp_path, tiny_ckpt)
    commands = section_commands()
    assert [c[0] for c in commands] == ["ddpm-eval"] * 4 + ["ddpm-convert-adm"] * 2 + ["ddpm-sample", "ddpm-eval"]
    evals = 0
    for command in commands:
        tool, args = command[0], [_substitute(arg, stand_ins) for arg in command[1:]]
        if tool == "ddpm-convert-adm":
            tiny = TINY_CLASSIFIER_FLAGS if "classifier64" in args else TINY_UNET_FLAGS
            convert([*args, *tiny])
            assert Path(args[1]).is_file()
            continue
        out = tmp_path / "outputs" / tool.removeprefix("ddpm-") / str(evals)
        if tool == "ddpm-eval":
            cfg = compose_run([*args, *TINY_EVAL], out, config_name="eval")
        else:
            cfg = compose_run([*args, *TINY_SAMPLE], out, config_name="sample")
        if tool == "ddpm-sample":
            result = sample(cfg)
            assert np.load(result["outputs"]["samples"])["arr_0"].shape == (4, 64, 64, 3)
            continue
        evals += 1
        results = evaluate(cfg)
        if cfg.write_reference:
            assert Path(cfg.write_reference).is_file()
            continue
        wanted = {f"{m}@4" for m in ("fid", "sfid")} | ({"precision@4", "recall@4"} if "pr" in cfg.metrics else set())
        assert wanted <= set(results["metrics"]), (command, results["metrics"])
        assert all(np.isfinite(v) for v in results["metrics"].values())
    assert evals == 5
