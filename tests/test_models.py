"""ADM UNet / EncoderUNet: configs, conditioning, checkpointing, fidelity to the official layout, loading.

Fidelity is checked against an independent description of OpenAI's guided-diffusion networks written here from
their construction rules (``official_layout``): the parameter names and shapes of UNetModel / EncoderUNetModel
and a functional forward pass over a state dict in that layout (``reference_forward``), with ADM's attention
math (legacy and new qkv orders, q and k each scaled by ch^-1/4, softmax over keys).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.models import (
    ADM_PRESETS,
    EncoderUNet,
    UNet,
    adm_model_config,
    load_adm_state_dict,
    to_adm_state_dict,
)

CONF = Path(CONFIG_DIR) / "model"
EXTRA_KEYS = {"class_cond", "compile", "channels_last"}
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------- helpers
def load_config(name: str, group: str = "model") -> dict:
    """conf/<group>/<name>.yaml with Hydra's extend-a-base defaults resolved (no Hydra needed)."""
    raw = yaml.safe_load((CONF.parent / group / f"{name}.yaml").read_text())
    cfg: dict = {}
    for entry in raw.pop("defaults", []):
        if entry != "_self_":
            cfg.update(load_config(entry, group))
    cfg.update(raw)
    return cfg


def tiny(cfg: dict) -> dict:
    """Shrink a 32 px config to 16 px for a fast CPU test, keeping its flags: 32 base channels, at most 32
    channels per head, attention at the same levels (resolutions halved)."""
    cfg = {
        **cfg,
        "model_channels": 32,
        "attention_resolutions": [r // 2 for r in cfg["attention_resolutions"]],
    }
    if cfg.get("num_head_channels", -1) != -1:
        cfg["num_head_channels"] = min(cfg["num_head_channels"], 32)
    return cfg


def build_from_config(
    name: str, image_size: int = 16, in_channels: int = 1, out_channels: int = 1, shrink: bool = True
):
    cfg = load_config(name)
    cfg = tiny(cfg) if shrink else cfg
    kwargs = {k: v for k, v in cfg.items() if k not in EXTRA_KEYS}
    return UNet(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        num_classes=NUM_CLASSES if cfg["class_cond"] else None,
        **kwargs,
    )


def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def small_unet(**kw) -> UNet:
    args = dict(
        image_size=16,
        in_channels=2,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=(8,),
        channel_mult=(1, 2),
    )
    args.update(kw)
    return UNet(**args)


def inputs(n: int = 2, channels: int = 2, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=gen), torch.tensor([3, 917][:n] + [0] * (n - 2))


def parts(shapes: dict[str, tuple]) -> Counter:
    """Parameter count per top-level part (time_embed, label_emb, input_blocks, middle_block, ...)."""
    counts: Counter = Counter()
    for name, shape in shapes.items():
        counts[name.split(".")[0]] += math.prod(shape)
    return counts


def our_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in to_adm_state_dict(module).items()}


# ---------------------------------------------------------------- the official architecture, independently
def official_layout(
    image_size,
    in_channels,
    model_channels,
    out_channels,
    num_res_blocks,
    attention_resolutions,
    channel_mult,
    num_classes=None,
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    use_new_attention_order=False,
    pool=None,
    **_ignored,
):
    """Parameter shapes of ADM's UNetModel (``pool=None``) or EncoderUNetModel, and a program for the forward.

    Follows the official construction rules: attention where the downsampling rate ``ds`` is in
    ``image_size // res``; skip channels pushed after every input block; ``num_res_blocks + 1`` blocks per
    level on the way up, the last of each level (except level 0) ending with an upsampler; attention in the
    middle.
    """
    emb = 4 * model_channels
    shapes: dict[str, tuple] = {}
    heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
    attn_ds = {image_size // r for r in attention_resolutions}

    def tensor(name, *shape):
        shapes[name] = shape

    def linear(name, i, o, k=None):
        tensor(f"{name}.weight", o, i, *(() if k is None else (k,)))
        tensor(f"{name}.bias", o)

    def conv(name, i, o, k):
        tensor(f"{name}.weight", o, i, k, k)
        tensor(f"{name}.bias", o)

    def norm(name, c):
        tensor(f"{name}.weight", c)
        tensor(f"{name}.bias", c)

    def res(name, i, o, mode=None):
        norm(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", i, o, 3)
        linear(f"{name}.emb_layers.1", emb, 2 * o if use_scale_shift_norm else o)
        norm(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{name}.skip_connection", i, o, 1)
        return ("res", name, mode)

    def attn(name, c, heads):
        norm(f"{name}.norm", c)
        linear(f"{name}.qkv", c, 3 * c, k=1)
        linear(f"{name}.proj_out", c, c, k=1)
        return ("attn", name, c // num_head_channels if num_head_channels != -1 else heads)

    linear("time_embed.0", model_channels, emb)
    linear("time_embed.2", emb, emb)
    if num_classes is not None:
        tensor("label_emb.weight", num_classes, emb)
    ch = int(channel_mult[0] * model_channels)
    conv("input_blocks.0.0", in_channels, ch, 3)
    input_blocks = [[("conv", "input_blocks.0.0", None)]]
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            name = f"input_blocks.{len(input_blocks)}"
            ops = [res(f"{name}.0", ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attn_ds:
                ops.append(attn(f"{name}.1", ch, num_heads))
            input_blocks.append(ops)
            chans.append(ch)
        if level != len(channel_mult) - 1:
            name = f"input_blocks.{len(input_blocks)}.0"
            if resblock_updown:
                input_blocks.append([res(name, ch, ch, "down")])
            else:
                conv(f"{name}.op", ch, ch, 3)
                input_blocks.append([("down", f"{name}.op", None)])
            chans.append(ch)
            ds *= 2
    middle = [
        res("middle_block.0", ch, ch),
        attn("middle_block.1", ch, num_heads),
        res("middle_block.2", ch, ch),
    ]
    program = {
        "input_blocks": input_blocks,
        "middle_block": middle,
        "model_channels": model_channels,
        "shift": use_scale_shift_norm,
        "new_order": use_new_attention_order,
        "pool": pool,
    }
    if pool is not None:
        feature_size = sum(chans) + ch
        if pool == "attention":
            norm("out.0", ch)
            tensor("out.2.positional_embedding", ch, (image_size // ds) ** 2 + 1)
            linear("out.2.qkv_proj", ch, 3 * ch, k=1)
            linear("out.2.c_proj", ch, out_channels, k=1)
            program["pool_heads"] = ch // num_head_channels
        elif pool == "adaptive":
            norm("out.0", ch)
            linear("out.3", ch, out_channels, k=1)
            shapes["out.3.weight"] += (1,)
        elif pool == "spatial":
            linear("out.0", feature_size, 2048)
            linear("out.2", 2048, out_channels)
        else:
            linear("out.0", feature_size, 2048)
            norm("out.1", 2048)
            linear("out.3", 2048, out_channels)
        return shapes, program
    output_blocks = []
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            name = f"output_blocks.{len(output_blocks)}"
            ops = [res(f"{name}.0", ch + chans.pop(), int(model_channels * mult))]
            ch = int(model_channels * mult)
            if ds in attn_ds:
                ops.append(attn(f"{name}.1", ch, heads_up))
            if level and i == num_res_blocks:
                if resblock_updown:
                    ops.append(res(f"{name}.{len(ops)}", ch, ch, "up"))
                else:
                    conv(f"{name}.{len(ops)}.conv", ch, ch, 3)
                    ops.append(("up", f"{name}.{len(ops)}.conv", None))
                ds //= 2
            output_blocks.append(ops)
    norm("out.0", ch)
    conv("out.2", int(channel_mult[0] * model_channels), out_channels, 3)
    program["output_blocks"] = output_blocks
    return shapes, program


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ref_res(sd, name, x, emb, mode, shift):
    h = F.silu(_gn(sd, f"{name}.in_layers.0", x))
    if mode == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif mode == "up":
        h, x = (
            F.interpolate(h, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="nearest"),
        )
    h = F.conv2d(h, sd[f"{name}.in_layers.2.weight"], sd[f"{name}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"])[
        :, :, None, None
    ]
    if shift:
        scale, offset = e.chunk(2, dim=1)
        h = _gn(sd, f"{name}.out_layers.0", h) * (1 + scale) + offset
    else:
        h = _gn(sd, f"{name}.out_layers.0", h + e)
    h = F.conv2d(F.silu(h), sd[f"{name}.out_layers.3.weight"], sd[f"{name}.out_layers.3.bias"], padding=1)
    if f"{name}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{name}.skip_connection.weight"], sd[f"{name}.skip_connection.bias"])
    return x + h


def _ref_qkv_attention(qkv, heads, new_order):
    """ADM's attention on [B, 3*C, T]: q, k each scaled by ch^-1/4, softmax over keys, [B, C, T] out."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    s = ch**-0.25
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def _ref_attn(sd, name, x, heads, new_order):
    b, c, hgt, wid = x.shape
    xf = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(sd, f"{name}.norm", xf), sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
    h = _ref_qkv_attention(qkv, heads, new_order)
    h = F.conv1d(h, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])
    return (xf + h).reshape(b, c, hgt, wid)


def reference_forward(sd, program, x, t, y=None):
    """A functional ADM forward pass over an official-layout state dict (float32, eval mode)."""
    mc, shift, new_order = program["model_channels"], program["shift"], program["new_order"]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def run(ops, h):
        for kind, name, extra in ops:
            if kind == "conv":
                h = F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)
            elif kind == "down":
                h = F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=2, padding=1)
            elif kind == "up":
                h = F.conv2d(
                    F.interpolate(h, scale_factor=2, mode="nearest"),
                    sd[f"{name}.weight"],
                    sd[f"{name}.bias"],
                    padding=1,
                )
            elif kind == "res":
                h = _ref_res(sd, name, h, emb, extra, shift)
            else:
                h = _ref_attn(sd, name, h, extra, new_order)
        return h

    hs, h = [], x
    for ops in program["input_blocks"]:
        h = run(ops, h)
        hs.append(h)
    h = run(program["middle_block"], h)
    pool = program["pool"]
    if pool == "attention":
        h = F.silu(_gn(sd, "out.0", h)).flatten(2)
        h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1) + sd["out.2.positional_embedding"][None]
        h = F.conv1d(h, sd["out.2.qkv_proj.weight"], sd["out.2.qkv_proj.bias"])
        h = _ref_qkv_attention(h, program["pool_heads"], new_order=True)
        return F.conv1d(h, sd["out.2.c_proj.weight"], sd["out.2.c_proj.bias"])[:, :, 0]
    if pool is not None:
        raise NotImplementedError(pool)
    for ops in program["output_blocks"]:
        h = run(ops, torch.cat([h, hs.pop()], dim=1))
    h = F.silu(_gn(sd, "out.0", h))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def random_official_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------ configs
MODEL_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
CLASSIFIER_CONFIGS = sorted(p.stem for p in (CONF.parent / "classifier").glob("*.yaml"))
CLASSIFIER_EXTRA_KEYS = {"max_t"}  # a ClassifierModule argument, not an EncoderUNet one
IMAGENET64 = adm_model_config("unet", ADM_PRESETS["imagenet64"][1])
CLASSIFIER64 = adm_model_config("classifier", ADM_PRESETS["classifier64"][1])


def test_config_files_present_and_keys_are_constructor_args():
    expected = {
        "ddpm_base",
        "adm_depth",
        "adm_heads",
        "adm_head_channels64",
        "adm_head_channels32",
        "adm_attn_multires",
        "adm_biggan",
        "adm_adagn",
        "adm_rescale",
        "adm",
        "adm_imagenet64",
    }
    assert expected <= set(MODEL_CONFIGS)
    import inspect

    unet_args = set(inspect.signature(UNet).parameters) - {
        "image_size",
        "in_channels",
        "out_channels",
        "num_classes",
    }
    base = load_config("ddpm_base")
    assert set(base) == unet_args | EXTRA_KEYS
    for name in MODEL_CONFIGS:
        raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
        assert set(load_config(name)) == set(base), name
        if name != "ddpm_base":
            assert raw["defaults"][-1] == "_self_" and 1 <= len(raw) - 1 <= 5, name
    enc_args = set(inspect.signature(EncoderUNet).parameters) - {"image_size", "in_channels", "out_channels"}
    assert {"default", "wide"} <= set(CLASSIFIER_CONFIGS)
    for name in CLASSIFIER_CONFIGS:
        assert set(load_config(name, "classifier")) == enc_args | CLASSIFIER_EXTRA_KEYS, name


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_forward_backward(name):
    torch.manual_seed(0)
    model = build_from_config(name)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0, 999])
    y = torch.tensor([1, 7]) if model.num_classes else None
    out = model(x, t, y)
    assert out.shape == (2, 1, 16, 16)
    assert torch.all(out == 0)  # zero-initialised output conv
    perturb_(model)
    out = model(x, t, y)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", CLASSIFIER_CONFIGS)
def test_classifier_config_forward_backward(name):
    torch.manual_seed(0)
    cfg = {k: v for k, v in tiny(load_config(name, "classifier")).items() if k not in CLASSIFIER_EXTRA_KEYS}
    model = EncoderUNet(image_size=16, in_channels=1, out_channels=NUM_CLASSES, **cfg)
    logits = model(torch.randn(2, 1, 16, 16), torch.tensor([5, 900]))
    assert logits.shape == (2, NUM_CLASSES)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------- behaviour
def test_output_exactly_zero_at_init():
    model = small_unet(num_classes=3, use_scale_shift_norm=True, resblock_updown=True)
    x, t = inputs()
    assert torch.equal(model(x, t, torch.tensor([0, 2])), torch.zeros(2, 4, 16, 16))


def test_class_conditioning_changes_output():
    model = perturb_(small_unet(num_classes=3)).eval()
    x, t = inputs()
    a = model(x, t, torch.tensor([0, 0]))
    b = model(x, t, torch.tensor([1, 2]))
    assert not torch.allclose(a, b)
    assert torch.allclose(a, model(x, t, torch.tensor([0, 0])))


def test_timesteps_change_output_and_scalar_t_broadcasts():
    model = perturb_(small_unet()).eval()
    x, _ = inputs()
    a = model(x, torch.tensor([10, 10]))
    assert not torch.allclose(a, model(x, torch.tensor([500, 500])))
    assert torch.allclose(a, model(x, torch.tensor(10)))
    assert torch.allclose(a, model(x, torch.tensor([10.0, 10.0])))  # fractional timesteps allowed


def test_autocast_bf16_forward():
    model = perturb_(small_unet(num_classes=3, use_scale_shift_norm=True, resblock_updown=True)).eval()
    x, t = inputs()
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_y_required_iff_class_conditional():
    x, t = inputs()
    with pytest.raises(ValueError, match="class-conditional.*pass y"):
        small_unet(num_classes=3)(x, t)
    with pytest.raises(ValueError, match="unconditional.*without y"):
        small_unet()(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"y must have shape \[N\]"):
        small_unet(num_classes=3)(x, t, torch.tensor([[0, 1]]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_same_gradients(dropout):
    flags = dict(num_classes=3, use_scale_shift_norm=True, resblock_updown=True, dropout=dropout)
    plain = perturb_(small_unet(**flags))
    ckpt = small_unet(use_checkpoint=True, **flags)
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs()
    y = torch.tensor([0, 2])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        model(x, t, y).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [dict(num_heads=2), dict(num_head_channels=32)])
def test_attention_orders_match_adm_math(new_order, heads):
    """Both qkv channel orders, against ADM's attention written over the official (Conv1d) layout."""
    model = perturb_(small_unet(model_channels=64, use_new_attention_order=new_order, **heads)).eval()
    shapes, program = official_layout(
        **{
            **dict(
                image_size=16,
                in_channels=2,
                model_channels=64,
                out_channels=4,
                num_res_blocks=1,
                attention_resolutions=(8,),
                channel_mult=(1, 2),
                use_new_attention_order=new_order,
            ),
            **heads,
        }
    )
    sd = to_adm_state_dict(model)
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_forward(sd, program, x, t), rtol=1e-4, atol=1e-5)
    # the two orders are different readings of the same weights
    other = small_unet(model_channels=64, use_new_attention_order=not new_order, **heads).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(x, t), model(x, t))


def test_rescale_resblocks_scales_residual_sum():
    from ddpm_lightning.models import ResBlock

    torch.manual_seed(0)
    block = perturb_(ResBlock(32, 16, out_channels=64))
    rescaled = ResBlock(32, 16, out_channels=64, rescale=True)
    rescaled.load_state_dict(block.state_dict())
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    torch.testing.assert_close(rescaled(x, emb), block(x, emb) / math.sqrt(2))


# ------------------------------------------------------------------------------- official fidelity
REFERENCE_CASES = {
    "ddpm_like": dict(num_res_blocks=2, attention_resolutions=(8,), channel_mult=(1, 2, 2), num_heads=2),
    "adm_full": dict(
        num_res_blocks=1,
        attention_resolutions=(16, 8, 4),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=True,
        num_classes=5,
        dropout=0.1,
    ),
    "heads_upsample": dict(
        num_res_blocks=1,
        attention_resolutions=(8,),
        channel_mult=(1, 1.5),
        num_heads=2,
        num_heads_upsample=3,
        use_scale_shift_norm=True,
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_official_layout_and_reference_forward(case):
    flags = dict(image_size=16, in_channels=3, model_channels=64, out_channels=6, **REFERENCE_CASES[case])
    model = UNet(**flags).eval()
    shapes, program = official_layout(**flags)
    assert our_shapes(model) == shapes  # names, shapes and order-free equality
    sd = random_official_state(shapes)
    load_adm_state_dict(model, sd)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 600])
    y = torch.tensor([4, 0]) if flags.get("num_classes") else None
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y), reference_forward(sd, program, x, t, y), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_classifier_matches_official_layout(pool):
    flags = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=7,
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool=pool,
    )
    model = EncoderUNet(**flags).eval()
    shapes, program = official_layout(**flags)
    assert our_shapes(model) == shapes
    sd = random_official_state(shapes)
    load_adm_state_dict(model, sd)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 600])
    with torch.no_grad():
        logits = model(x, t)
    assert logits.shape == (2, 7)
    if pool == "attention":
        torch.testing.assert_close(logits, reference_forward(sd, program, x, t), rtol=1e-4, atol=1e-5)


def test_imagenet64_parameter_counts_per_part():
    """ADM ImageNet-64 (released 64x64_diffusion.pt flags): 296M parameters, part by part."""
    with torch.device("meta"):
        model = UNet(**IMAGENET64)
    shapes, _ = official_layout(**IMAGENET64)
    # time_embed: 192*768 + 768 + 768*768 + 768; label_emb: 1000*768; out: GroupNorm(192) + conv 192->6 3x3.
    # middle: 2 AdaGN res blocks at 768 (2 * 11_802_624) + attention (1536 + 768*2304 + 2304 + 768*768 + 768).
    expected = {
        "time_embed": 738_816,
        "label_emb": 768_000,
        "input_blocks": 90_298_560,
        "middle_block": 2 * 11_802_624 + 2_363_904,
        "output_blocks": 178_119_168,
        "out": 2 * 192 + 192 * 6 * 9 + 6,
    }
    assert dict(parts(shapes)) == expected
    assert dict(parts(our_shapes(model))) == expected
    assert model.num_parameters() == sum(expected.values()) == 295_904_454


def test_classifier64_parameter_counts_per_part():
    """ADM's 64x64 noisy classifier (width 128, depth 4, attention pooling)."""
    with torch.device("meta"):
        model = EncoderUNet(**CLASSIFIER64)
    shapes, _ = official_layout(**CLASSIFIER64)
    assert dict(parts(our_shapes(model))) == dict(parts(shapes))
    assert parts(shapes)["time_embed"] == 128 * 512 + 512 + 512 * 512 + 512
    assert parts(shapes)["out"] == 2 * 512 + 512 * 65 + (512 * 1536 + 1536) + (512 * 1000 + 1000)
    assert model.num_parameters() == 65_438_568


@pytest.mark.parametrize("preset", sorted(ADM_PRESETS))
def test_presets_match_official_layout(preset):
    kind, flags = ADM_PRESETS[preset]
    config = adm_model_config(kind, flags)
    with torch.device("meta"):
        model = (UNet if kind == "unet" else EncoderUNet)(**config)
    shapes, _ = official_layout(**config)
    assert our_shapes(model) == shapes
    assert model.num_parameters() == PRESET_COUNTS[preset]


PRESET_COUNTS = {  # the paper quotes 296M (64x64) and 554M (256x256) for the diffusion models
    "imagenet64": 295_904_454,
    "imagenet128": 421_529_606,
    "imagenet256": 553_838_086,
    "imagenet256_uncond": 552_814_086,
    "lsun256": 552_814_086,
    "classifier64": 65_438_568,
    "classifier128": 42_568_040,
    "classifier256": 54_096_360,
}


TINY_COUNTS = {  # tiny(): model_channels 32, 1 channel in/out, 10 classes where class_cond
    "ddpm_base": 1_623_169,
    "adm_heads": 1_623_169,
    "adm_head_channels64": 1_623_169,
    "adm_head_channels32": 1_623_169,
    "adm_rescale": 1_623_169,
    "adm_depth": 2_643_905,
    "adm_attn_multires": 1_728_449,
    "adm_biggan": 1_772_993,
    "adm_adagn": 1_742_881,
    "adm": 2_026_881,
    "adm_imagenet64": 7_799_681,
}


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_parameter_counts_match_official(name):
    model = build_from_config(name)
    cfg = tiny(load_config(name))
    shapes, _ = official_layout(
        image_size=16,
        in_channels=1,
        out_channels=1,
        num_classes=NUM_CLASSES if cfg["class_cond"] else None,
        **cfg,
    )
    assert dict(parts(our_shapes(model))) == dict(parts(shapes))
    assert model.num_parameters() == TINY_COUNTS[name]


# ------------------------------------------------------------------------------------ weight loading
def test_adm_state_dict_round_trip():
    flags = dict(
        num_classes=3,
        use_scale_shift_norm=True,
        resblock_updown=True,
        num_head_channels=32,
        use_new_attention_order=True,
    )
    source = perturb_(small_unet(**flags)).eval()
    official = to_adm_state_dict(source)
    assert official["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
    assert official["middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    target = load_adm_state_dict(small_unet(**flags).eval(), official)
    x, t = inputs()
    y = torch.tensor([2, 1])
    with torch.no_grad():
        assert torch.equal(target(x, t, y), source(x, t, y))


def test_mismatched_flags_name_the_tensor():
    official = to_adm_state_dict(small_unet(use_scale_shift_norm=True))
    with pytest.raises(
        ValueError,
        match=r"input_blocks\.1\.0\.emb_layers\.1\.weight: checkpoint \[64, 128\] "
        r"vs model \[32, 128\]",
    ):
        load_adm_state_dict(small_unet(), official)


def test_missing_and_unexpected_keys_listed():
    official = to_adm_state_dict(small_unet(num_res_blocks=2))
    with pytest.raises(
        ValueError,
        match=r"22 missing keys: input_blocks\.2\.0\.op\.weight, .*\(\+17 more\); "
        r"78 unexpected keys: input_blocks\.2\.0\.in_layers\.0\.weight",
    ):
        load_adm_state_dict(small_unet(), official)
    official = to_adm_state_dict(small_unet())
    official["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: label_emb\.weight.*unexpected keys: bogus\.weight"):
        load_adm_state_dict(small_unet(num_classes=3), official)


def test_state_dict_mismatch_is_one_line_or_none():
    from ddpm_lightning.models.state_dict import state_dict_mismatch

    model = {f"w{i}": torch.zeros(2, 3) for i in range(7)}
    assert state_dict_mismatch(model, dict(model)) is None
    checkpoint = {**{f"w{i}": torch.zeros(2, 3) for i in range(1, 7)}, "w3": torch.zeros(3, 3), "extra": torch.zeros(1)}
    del checkpoint["w6"]
    assert state_dict_mismatch(model, checkpoint) == (
        "first differing tensor w3: checkpoint [3, 3] vs model [2, 3]; 2 missing keys: w0, w6; "
        "1 unexpected keys: extra")
    many = state_dict_mismatch(model, {})
    assert many == "7 missing keys: w0, w1, w2, w3, w4 (+2 more)" and "\n" not in many


# ------------------------------------------------------------------------------------------ bad args
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=18, channel_mult=(1, 2, 2)), r"divisible by 2\*\*\(len\(channel_mult\)-1\)=4"),
        (dict(attention_resolutions=(32,)), r"never reached; allowed: \[16, 8\]"),
        (dict(model_channels=48), "multiple of 32"),
        (dict(num_head_channels=48, model_channels=64), "num_head_channels=48 must divide"),
        (dict(num_heads=3), "num_heads=3 must divide"),
        (dict(num_heads_upsample=5), "num_heads_upsample=5 must divide"),
        (dict(num_classes=0), "num_classes must be None"),
        (dict(num_res_blocks=0), "num_res_blocks must be >= 1"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(channel_mult=()), "channel_mult must be a non-empty"),
    ],
)
def test_bad_unet_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_unet(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pool="max"), "unknown pool 'max'; allowed: adaptive, attention, spatial, spatial_v2"),
        (dict(pool="attention", num_head_channels=-1), "needs num_head_channels != -1"),
    ],
)
def test_bad_classifier_args(kwargs, match):
    args = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=(8,),
        channel_mult=(1, 2),
        num_head_channels=32,
    )
    with pytest.raises(ValueError, match=match):
        EncoderUNet(**{**args, **kwargs})


def test_lists_accepted_like_hydra_gives():
    model = small_unet(channel_mult=[1, 2], attention_resolutions=[8])
    assert model.channel_mult == (1, 2) and model.attention_resolutions == (8,)


