"""``ddpm-convert-adm``: official-layout file in, loadable checkpoint out; clean exit 2 on bad input."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.cli.convert_adm import main
from ddpm_lightning.models import EncoderUNet, UNet, adm_model_config, to_adm_state_dict

# ADM MODEL_FLAGS for a tiny model (as one would paste them from guided-diffusion's README)
TINY_FLAGS = [
    "--image_size",
    "16",
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--channel_mult",
    "1,2",
    "--attention_resolutions",
    "8",
    "--num_head_channels",
    "32",
    "--learn_sigma",
    "True",
    "--class_cond",
    "True",
    "--resblock_updown",
    "True",
    "--use_scale_shift_norm",
    "True",
    "--use_new_attention_order",
    "True",
    "--use_fp16",
    "True",
    "--noise_schedule",
    "cosine",
]


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


@pytest.fixture
def official_file(tmp_path):
    model = _randomize(
        UNet(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(8,),
            channel_mult=(1, 2),
            num_classes=1000,
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
            use_new_attention_order=True,
        )
    )
    path = tmp_path / "tiny_adm.pt"
    torch.save(to_adm_state_dict(model), path)
    return path, model


def test_convert_tiny_model(official_file, tmp_path):
    path, source = official_file
    out = tmp_path / "sub" / "converted.pt"
    main([str(path), str(out), *TINY_FLAGS])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model_class"] == "UNet"
    assert ckpt["adm_flags"]["noise_schedule"] == "cosine" and ckpt["adm_flags"]["learn_sigma"] is True
    model = UNet(**ckpt["model_config"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([5, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), source(x, t, y))


def test_convert_classifier_with_config_override(tmp_path):
    config = adm_model_config("classifier", {"image_size": 64, "classifier_depth": 1})
    config.update(model_channels=32, attention_resolutions=[8], out_channels=5)
    source = _randomize(EncoderUNet(**config))
    path = tmp_path / "clf.pt"
    torch.save(to_adm_state_dict(source), path)
    out = tmp_path / "clf_converted.pt"
    main(
        [
            str(path),
            str(out),
            "--kind",
            "classifier",
            "--classifier_depth",
            "1",
            "--classifier_width",
            "32",
            "--classifier_attention_resolutions",
            "8",
            "--config",
            "out_channels=5",
        ]
    )
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model_class"] == "EncoderUNet" and ckpt["model_config"]["pool"] == "attention"
    model = EncoderUNet(**ckpt["model_config"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(model(x, t), source(x, t))


def test_mismatched_flags_exit_2_with_one_line(official_file, tmp_path, capsys):
    path, _ = official_file
    flags = list(TINY_FLAGS)
    flags[flags.index("--use_scale_shift_norm") + 1] = "False"
    with pytest.raises(SystemExit) as exc:
        main([str(path), str(tmp_path / "out.pt"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "input_blocks.1.0.emb_layers.1.weight: checkpoint [64, 128] vs model [32, 128]" in err
    assert not (tmp_path / "out.pt").exists()


def test_missing_file_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope.pt"), str(tmp_path / "out.pt"), "--preset", "imagenet64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-convert-adm: error: cannot read ADM checkpoint") and "\n" not in err


@pytest.mark.parametrize("content,reason", [(b"hello\n", "it is a text file, not a torch checkpoint"),
                                            (b"", "it is an empty file, not a torch checkpoint"),
                                            (None, "it is a folder")])
def test_not_a_checkpoint_is_one_line_before_torch(content, reason, tmp_path, capsys):
    path = tmp_path / "in.pt"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main([str(path), str(tmp_path / "out.pt"), "--preset", "imagenet64"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"ddpm-convert-adm: error: cannot read ADM checkpoint {path}: {reason}; give an official guided-diffusion "
        f"checkpoint (e.g. 64x64_diffusion.pt)")


def test_wrong_kind_flags_and_bad_config_exit_2(official_file, tmp_path, capsys):
    path, _ = official_file
    for extra in (["--classifier_depth", "2"], ["--config", "nonsense=1"]):
        with pytest.raises(SystemExit) as exc:
            main([str(path), str(tmp_path / "out.pt"), *TINY_FLAGS, *extra])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "belong to --kind classifier" in err and "--config expects KEY=VALUE" in err


def test_converted_official_weights_sample_and_guide_through_the_cli(tmp_path):
    """ddpm-sample takes a converted official UNet (its flags give the process) and a converted classifier."""
    import numpy as np
    from run_config import compose_run

    from ddpm_lightning.cli.generation import load_model_and_guidance
    from ddpm_lightning.cli.sample import sample

    unet = _randomize(UNet(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                           attention_resolutions=(32,), channel_mult=(1, 2), num_classes=1000, num_head_channels=32,
                           use_scale_shift_norm=True))
    torch.save(to_adm_state_dict(unet), tmp_path / "unet.pt")
    unet_flags = ["--image_size", "64", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                  "--attention_resolutions", "32", "--num_head_channels", "32", "--learn_sigma", "True",
                  "--class_cond", "True", "--noise_schedule", "cosine", "--timestep_respacing", "4"]
    main([str(tmp_path / "unet.pt"), str(tmp_path / "unet_ours.pt"), *unet_flags])
    config = adm_model_config("classifier", {"image_size": 64, "classifier_depth": 1})
    config.update(model_channels=32, attention_resolutions=[32], channel_mult=[1, 2])
    clf = _randomize(EncoderUNet(**config))
    torch.save(to_adm_state_dict(clf), tmp_path / "clf.pt")
    clf_flags = ["--kind", "classifier", "--image_size", "64", "--classifier_depth", "1", "--classifier_width", "32",
                 "--classifier_attention_resolutions", "32", "--config", "channel_mult=[1,2]"]
    main([str(tmp_path / "clf.pt"), str(tmp_path / "clf_linear.pt"), *clf_flags])
    main([str(tmp_path / "clf.pt"), str(tmp_path / "clf_ours.pt"), *clf_flags, "--noise_schedule", "cosine"])

    module, guidance = load_model_and_guidance(
        str(tmp_path / "unet_ours.pt"), {"classifier_ckpt": str(tmp_path / "clf_ours.pt"), "scale": 1.0}, "cpu")
    cond_fn, classes = guidance.cond_fn, guidance.classifier_classes
    hp = module.hparams
    assert (hp.diffusion["schedule"], hp.diffusion["var_type"], hp.diffusion["num_timesteps"]) == \
        ("cosine", "learned_range", 1000)
    assert module.num_classes == 1000 and classes == 1000 and cond_fn is not None
    assert module.sample_settings.method == "ddpm" and module.sample_settings.steps == "4"
    x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(module.ema_net(x, t, y), unet(x, t, y))  # the official weights, unchanged
    with pytest.raises(ValueError, match="classifier was trained for T=1000 linear"):
        load_model_and_guidance(str(tmp_path / "unet_ours.pt"),
                                {"classifier_ckpt": str(tmp_path / "clf_linear.pt"), "scale": 1.0}, "cpu")

    result = sample(compose_run([f"ckpt={tmp_path / 'unet_ours.pt'}", "num_samples=2", "device=cpu", "y=3",
                                 f"guidance.classifier_ckpt={tmp_path / 'clf_ours.pt'}", "guidance.scale=1.0"],
                                tmp_path / "out", config_name="sample"))
    assert result["sampling"] == {"method": "ddpm", "steps": "4", "eta": 0.0, "schedule": "adm"}
    with np.load(tmp_path / "out" / "samples.npz", allow_pickle=False) as data:
        assert data["arr_0"].shape == (2, 64, 64, 3) and data["arr_1"].tolist() == [3, 3]
