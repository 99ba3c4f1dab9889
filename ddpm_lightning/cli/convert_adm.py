"""``ddpm-convert-adm IN.pt OUT.pt``: convert an OpenAI guided-diffusion (ADM) checkpoint to our format.

Give the checkpoint's flags as ADM's scripts take them (paste ``MODEL_FLAGS`` / ``CLASSIFIER_FLAGS``) or
name a published model with ``--preset``; flags given after a preset override it, ``--config key=value``
overrides the resulting constructor arguments. Examples::

    ddpm-convert-adm 64x64_diffusion.pt adm64.pt --preset imagenet64
    ddpm-convert-adm 128x128_classifier.pt clf128.pt --preset classifier128
    ddpm-convert-adm model.pt out.pt --image_size 64 --num_channels 192 --num_res_blocks 3 \\
        --learn_sigma True \\
        --class_cond True --attention_resolutions 32,16,8 --num_head_channels 64 --resblock_updown True \\
        --use_new_attention_order True --use_scale_shift_norm True

The output (``torch.load(..., weights_only=True)``-safe) is ``{"state_dict", "model_class" ("UNet" or
"EncoderUNet"), "model_config" (constructor kwargs), "adm_flags" (all ADM flags, incl. diffusion ones)}``;
rebuild with ``UNet(**ckpt["model_config"]).load_state_dict(ckpt["state_dict"])``. Errors (unreadable input,
flags that do not fit the checkpoint) print one line and exit with status 2.

``ddpm-sample`` / ``ddpm-eval ckpt=<converted UNet>`` and ``guidance.classifier_ckpt=<converted classifier>``
take the output directly: ``diffusion_module_from_adm`` / ``classifier_guidance_from_adm`` (the checkpoint owner,
``modules/checkpoint.py``) rebuild the
diffusion process from the stored ADM flags (``noise_schedule``, ``diffusion_steps``, ``learn_sigma`` ->
learned-range variance, else ADM's fixed-large; ``predict_xstart``; ``timestep_respacing`` as the default
sampling steps, else all of them, with ADM's ancestral sampler) and the class count from the model.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from ..adm_flags import (
    ADM_CLASSIFIER_DEFAULTS,
    ADM_DIFFUSION_DEFAULTS,
    ADM_MODEL_DEFAULTS,
    ADM_PRESETS,
    KINDS,
    adm_model_config,
)
from ..artifacts import check_checkpoint_file

PROG = "ddpm-convert-adm"


def _bool(value: str) -> bool:
    low = value.lower()
    if low in ("true", "t", "yes", "y", "1"):
        return True
    if low in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(value.lower(), value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "input", type=Path, help="official ADM checkpoint (a state dict saved by guided-diffusion)"
    )
    parser.add_argument("output", type=Path, help="where to write the converted checkpoint")
    parser.add_argument("--preset", choices=sorted(ADM_PRESETS), help="flags of a published ADM checkpoint")
    parser.add_argument(
        "--kind", choices=KINDS, help="unet (diffusion model) or classifier; default: the preset's, else unet"
    )
    parser.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override constructor arguments after translation, e.g. num_heads=4",
    )
    flags = parser.add_argument_group("ADM flags (names and defaults as in guided_diffusion.script_util)")
    for name, default in {**ADM_MODEL_DEFAULTS, **ADM_CLASSIFIER_DEFAULTS, **ADM_DIFFUSION_DEFAULTS}.items():
        kind = _bool if isinstance(default, bool) else type(default)
        flags.add_argument(f"--{name}", type=kind, default=None, help=f"default {default!r}")
    return parser


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _resolve(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """-> (kind, ADM flags, constructor kwargs)."""
    kind, flags = ADM_PRESETS[args.preset] if args.preset else ("unet", {})
    kind = args.kind or kind
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("input", "output", "preset", "kind", "config")
    }
    model_keys = set(ADM_CLASSIFIER_DEFAULTS if kind == "classifier" else ADM_MODEL_DEFAULTS)
    foreign = sorted(set(given) - model_keys - set(ADM_DIFFUSION_DEFAULTS))
    if foreign:
        other = "unet" if kind == "classifier" else "classifier"
        raise ValueError(f"flags {', '.join('--' + k for k in foreign)} belong to --kind {other}, not {kind}")
    flags = {**flags, **given}
    config = adm_model_config(kind, flags)
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or key not in config:
            raise ValueError(f"--config expects KEY=VALUE with KEY one of {', '.join(config)}; got {item!r}")
        config[key] = _literal(value)
    defaults = ADM_CLASSIFIER_DEFAULTS if kind == "classifier" else ADM_MODEL_DEFAULTS
    return kind, {**defaults, **ADM_DIFFUSION_DEFAULTS, **flags}, config


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        kind, flags, config = _resolve(args)  # --help and flag errors answer before torch is imported
    except (ValueError, TypeError) as err:
        _fail(str(err))
    try:  # missing, a folder, empty or text: one line before torch is imported
        check_checkpoint_file(args.input)
    except (OSError, ValueError) as err:
        reason = str(err).split(";")[0].replace(f"checkpoint {args.input} ", "it ")
        _fail(f"cannot read ADM checkpoint {args.input}: {reason}; give an official guided-diffusion checkpoint "
              f"(e.g. 64x64_diffusion.pt)")
    import torch

    from ..artifacts import NoSpaceLeft, atomic_write
    from ..models import EncoderUNet, UNet, load_adm_state_dict
    from ..modules.checkpoint import load_checkpoint_dict

    try:
        with torch.device("meta"):
            model = (EncoderUNet if kind == "classifier" else UNet)(**config)
    except (ValueError, TypeError) as err:
        _fail(str(err))
    try:
        state = load_checkpoint_dict(args.input)
    except Exception as err:  # any unreadable input: one line, exit 2
        _fail(f"cannot read ADM checkpoint {args.input}: {str(err).splitlines()[0]}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        _fail(f"{args.input} is not a state dict of tensors")
    try:
        load_adm_state_dict(model, state, assign=True)
    except ValueError as err:
        _fail(f"{args.input}: {err}")
    converted = {"state_dict": model.state_dict(), "model_class": type(model).__name__, "model_config": config,
                 "adm_flags": flags}
    try:
        atomic_write(args.output, lambda handle: torch.save(converted, handle))  # never a half-written file
    except OSError as err:
        _fail(str(err) if isinstance(err, NoSpaceLeft) else f"cannot write {args.output} ({err.strerror or err})")
    print(f"{PROG}: wrote {args.output} ({type(model).__name__}, {model.num_parameters():,} parameters)")


if __name__ == "__main__":
    main()
