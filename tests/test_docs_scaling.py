"""Every command of docs/scaling.md runs as written, at small size.

The commands are read from the document's fenced ``bash`` blocks (editing the doc is what is tested); the only
changes are tiny overrides appended (Hydra keeps the last value of a key; the converter lets flags after a
preset override it), the stand-ins for the files a researcher would have (a checkpoint, OpenAI's reference
batch, official weights, an image folder, a sweep folder) and, for the metric a tiny run logs, its size.
A block preceded by ``<!-- docs-test: skip (why) -->`` is not run; any other command must be runnable here.

- ``test_every_command_composes``: each command's config composes as written (every job of a sweep, the SLURM
  launcher's settings: what ``--cfg job`` would print) and passes the CLI's own checks.
- ``test_section_runs_at_small_size``: each section's commands run in order (a sweep: its first job, in a job
  folder that ``ddpm-report`` reads), CPU, tiny model; DDP (``trainer=ddp``) in 2 real processes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image
from run_config import TINY, compose_run

from ddpm_lightning.cli.convert_adm import main as convert
from ddpm_lightning.cli.evaluate import evaluate
from ddpm_lightning.cli.report import main as report
from ddpm_lightning.cli.report import parse_args as report_args
from ddpm_lightning.cli.sample import sample
from ddpm_lightning.cli.train import train
from ddpm_lightning.cli.validate import check_run_deep, sweep_jobs
from ddpm_lightning.config import CONFIG_DIR, register_configs
from ddpm_lightning.metrics import load_feature_extractor, reference_stats, write_adm_reference
from ddpm_lightning.models import EncoderUNet, UNet, adm_model_config, to_adm_state_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
TOOLS = ("ddpm-train", "ddpm-eval", "ddpm-sample", "ddpm-report", "ddpm-convert-adm")
TINY_SAMPLE = ["num_samples=4", "steps=2", "devices=1", "device=cpu", "shard_size=2", "batch_size=2"]
TINY_EVAL = [*TINY_SAMPLE, "feature=tiny", "reference_n=20", "pr_reference_n=10", "classifier_epochs=1"]
# training on this CPU: one process (the DDP section: two), one node, a tiny image folder when the command names one
TINY_TRAIN_CPU = ["++trainer.accelerator=cpu", "++trainer.devices=1", "++trainer.num_nodes=1"]
TINY_IMAGE_FOLDER = ["data.val_size=4", "data.num_workers=0", "data.image_size=16", "data.batch_size=8"]
# after --preset: the published architecture at a tiny width (image size, attention order etc. as the preset)
TINY_UNET_FLAGS = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                   "--attention_resolutions", "32", "--num_head_channels", "32"]
TINY_CLASSIFIER_FLAGS = ["--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions",
                         "32", "--config", "channel_mult=[1,2]"]
SWEEP = "sweep"  # the stand-in sweep folder (``multirun/<experiment>/<time>``) of a section's sweeps


@dataclass(frozen=True)
class Command:
    section: int
    number: int  # within its section
    argv: tuple[str, ...]
    skip: str | None  # the doc's reason not to run it

    @property
    def id(self) -> str:
        return f"s{self.section}.{self.number}-{self.argv[0]}"


def doc_commands() -> list[Command]:
    """Every command line of the document's ``bash`` blocks (continuations joined, comments dropped)."""
    text = DOC.read_text()
    commands: list[Command] = []
    block = re.compile(r"(?:<!-- docs-test: (?P<mark>[^\n]*?) -->\n)?```bash\n(?P<body>.*?)```", re.S)
    for match in block.finditer(text):
        headings = re.findall(r"^## (\d+)\.", text[:match.start()], flags=re.M)
        section = int(headings[-1]) if headings else 0
        mark = match.group("mark")
        skip = mark.removeprefix("skip").strip(" :()") if mark and mark.startswith("skip") else None
        for line in match.group("body").replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                number = sum(c.section == section for c in commands)
                commands.append(Command(section, number, tuple(argv), skip))
    return commands


COMMANDS = doc_commands()
SECTIONS = sorted({c.section for c in COMMANDS})


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


def _stand_in_paths(root: Path) -> dict[str, str]:
    images = root / "imagenet64_train"
    return {"multirun/ablate_arch/<time>": str(root / SWEEP), "/datasets/imagenet64/train": str(images),
            "/datasets/imagenet/train": str(images), "val/fid@10k": "val/fid@6",
            "outputs/eval/<time>/samples.npz": "outputs/eval/0/samples.npz"}


def _hydra_args(argv: list[str]) -> tuple[list[str], bool]:
    """A Hydra app's command line: its overrides and whether it is a multirun (``-m``)."""
    multirun = "-m" in argv or "--multirun" in argv
    return [a for a in argv if not a.startswith("-")], multirun


def _compose(config_name: str, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def _train_tiny(args: list[str]) -> list[str]:
    """The tiny overrides for a training command: the suite's ``TINY`` (its data set only when the command names
    none: a command's image folder stays, at 16 px), on this CPU."""
    names_data = any(a.startswith("data=") for a in args)
    tiny = [t for t in TINY if not (names_data and (t.startswith("data=") or t.startswith("data.limit")))]
    return [*tiny, *TINY_TRAIN_CPU, *(TINY_IMAGE_FOLDER if "data=image_folder" in args else [])]


# ------------------------------------------------------------------------------------------ the document
def test_every_command_has_a_runnable_form():
    """A command added to the doc must be one of the tools this test runs, or carry a skip mark with a reason."""
    assert len(COMMANDS) >= 16 and SECTIONS == [1, 2, 3, 4, 5, 6]
    for command in COMMANDS:
        if command.skip is not None:
            assert command.skip, f"{command.id}: a docs-test skip mark needs a reason"
            continue
        assert command.argv[0] in TOOLS, f"{command.id}: {command.argv[0]} has no runnable form in this test"
    assert [c.id for c in COMMANDS if c.skip] == ["s6.0-ddpm-train"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.skip], ids=lambda c: c.id)
def test_every_command_composes(command, tmp_path, monkeypatch):
    """As written (stand-in paths only): the config composes, every sweep job composes and passes the CLI's
    checks, a SLURM launcher follows the trainer's node count."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    stand_ins = _stand_in_paths(tmp_path)
    tool, argv = command.argv[0], [_substitute(a, stand_ins) for a in command.argv[1:]]
    if tool == "ddpm-report":
        assert Path(report_args(argv).sweep_dir).name == SWEEP
        return
    if tool == "ddpm-convert-adm":
        assert argv[0].endswith(".pt") and "--preset" in argv
        return
    overrides, multirun = _hydra_args(argv)
    config_name = {"ddpm-train": "train", "ddpm-eval": "eval", "ddpm-sample": "sample"}[tool]
    cfg = _compose(config_name, overrides)
    jobs = sweep_jobs(cfg) if multirun else [list(cfg.hydra.overrides.task)]
    assert jobs, command.id
    if multirun and "hydra/launcher=slurm" in overrides:
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert launcher.nodes == OmegaConf.select(cfg, "trainer.num_nodes", default=1)
        assert launcher.tasks_per_node == launcher.gpus_per_node
    for job in dict.fromkeys(map(tuple, (jobs[0], jobs[-1]))):  # a single run's one job: composed once
        job_cfg = compose_run(list(job), tmp_path / "job", config_name=config_name)
        if config_name == "train":
            check_run_deep(job_cfg)
        # ddpm-eval / ddpm-sample check their files (checkpoint, samples) too: run for real in the section test


# ------------------------------------------------------------------------------------------ at small size
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "model.class_cond=true"], out))
    return out / "checkpoints" / "last.ckpt"


def _run_train(command: Command, argv: list[str], root: Path) -> None:
    overrides, multirun = _hydra_args(argv)
    tiny = _train_tiny(overrides)
    if not multirun and "trainer=ddp" in overrides:  # plain DDP re-launches the command line: a real process
        env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(root / "cache")}
        out = root / "ddp"
        done = subprocess.run([sys.executable, "-m", "ddpm_lightning.train", *overrides, *tiny, "trainer.devices=2",
                               "trainer.max_steps=2", f"hydra.run.dir={out}"], capture_output=True, text=True,
                              timeout=600, env=env, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "summary.json").is_file()
        return
    if not multirun:
        train(compose_run([*overrides, *tiny], root / "outputs" / command.id))
        return
    # a sweep: its first job, in a job folder of the stand-in sweep folder (what ddpm-report reads)
    jobs = sweep_jobs(_compose("train", overrides))
    out = root / SWEEP / str(len(list((root / SWEEP).glob("*"))) if (root / SWEEP).is_dir() else 0)
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in jobs[0]))
    metrics = train(compose_run([*jobs[0], *tiny], out))
    assert metrics is not None and np.isfinite(metrics["val/fid@6"]), (command.id, metrics)


def _run_generation(tool: str, argv: list[str], root: Path, number: int) -> None:
    if tool == "ddpm-convert-adm":
        tiny = TINY_CLASSIFIER_FLAGS if "classifier64" in argv else TINY_UNET_FLAGS
        convert([*argv, *tiny])
        assert Path(argv[1]).is_file()
        return
    out = root / "outputs" / tool.removeprefix("ddpm-") / str(number)
    if tool == "ddpm-sample":
        result = sample(compose_run([*argv, *TINY_SAMPLE], out, config_name="sample"))
        assert np.load(result["outputs"]["samples"])["arr_0"].shape == (4, 64, 64, 3)
        return
    scores_samples = any(a.startswith("samples=") for a in argv)  # nothing is sampled: no sampler key (refused)
    cfg = compose_run([*argv, *[o for o in TINY_EVAL if not (scores_samples and o.startswith("steps="))]], out,
                      config_name="eval")
    results = evaluate(cfg)
    if cfg.write_reference:
        assert Path(cfg.write_reference).is_file()
        return
    wanted = {f"{m}@4" for m in ("fid", "sfid")} | ({"precision@4", "recall@4"} if "pr" in cfg.metrics else set())
    assert wanted <= set(results["metrics"]), (argv, results["metrics"])
    assert all(np.isfinite(v) for v in results["metrics"].values())


# every section with a runnable command; each takes seconds (section 3, two DDP processes: ~30 s)
@pytest.mark.parametrize("section", [s for s in SECTIONS if any(not c.skip for c in COMMANDS if c.section == s)])
def test_section_runs_at_small_size(section, tiny_ckpt, tmp_path, monkeypatch):
    for key in list(os.environ):  # what in-process DDP runs set (MASTER_PORT, LOCAL_RANK, ...) is undone after
        monkeypatch.setenv(key, os.environ[key])
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    stand_ins = {**_stand_ins(tmp_path, tiny_ckpt), **_stand_in_paths(tmp_path)}
    for command in [c for c in COMMANDS if c.section == section and not c.skip]:
        tool, argv = command.argv[0], [_substitute(a, stand_ins) for a in command.argv[1:]]
        if tool == "ddpm-train":
            _run_train(command, argv, tmp_path)
        elif tool == "ddpm-report":
            report(argv)
            assert (Path(argv[0]) / "report.md").is_file()
        else:
            _run_generation(tool, argv, tmp_path, command.number)


# ------------------------------------------------------------------------------------------ the statements
def _table(heading_row: str) -> dict[str, list[str]]:
    """The markdown table whose header row starts with ``heading_row``: {first cell: the other cells}."""
    lines = DOC.read_text().split(heading_row, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.parametrize("experiment, axis", [("ablate_arch", "model"), ("ablate_loss", "diffusion")])
def test_ablation_row_counts_are_the_sweeps(experiment, axis):
    params = _compose("train", [f"experiment={experiment}"]).hydra.sweeper.params
    rows, seeds = str(params[axis]).split(","), str(params.seed).split(",")
    line = next(line for line in DOC.read_text().splitlines() if f"-m experiment={experiment} " in line)
    assert f" {len(rows)} rows x {len(seeds)} seeds" in line, (line, rows, seeds)


def test_the_default_experiment_column_is_the_default_experiment():
    """Section 4's "embedded default" column says what `experiment=default` composes to."""
    cfg = _compose("train", ["experiment=default"])
    table = {part: cells[0] for part, cells in _table("| part | embedded default | ImageNet-64 |").items()}
    model, gm = cfg.model, cfg.callbacks.generative_metrics
    for text in (f"`{cfg.hydra.runtime.choices.model}` at {model.model_channels} channels",
                 f"mult ({','.join(str(m) for m in model.channel_mult)})", f"{model.num_res_blocks} residual block",
                 *(f"{r} px" for r in model.attention_resolutions), f"({model.num_head_channels} channels per head)",
                 "class-conditional" if model.class_cond else "unconditional"):
        assert text in table["model"], (text, table["model"])
    assert (cfg.diffusion.schedule, cfg.diffusion.mean_type, cfg.diffusion.loss_type) == ("cosine", "v", "simple")
    assert table["diffusion"] == "cosine, v-prediction, fixed variance, L_simple"
    lr = f"{cfg.optim.lr:.0e}".replace("e-0", "e-")
    assert table["batch / lr / EMA"] == (f"{cfg.data.batch_size}, {lr} ({cfg.optim.warmup_steps} warm-up steps, then "
                                         f"{cfg.optim.lr_schedule} decay to 0 where the run ends), {cfg.ema.decay}")
    assert table["precision"].startswith(f"`{cfg.trainer.precision}`")
    assert cfg.trainer.max_time == "00:00:10:00" and "`max_time` 10 min" in table["time budget"]
    assert f"`max_steps` {cfg.trainer.max_steps}" in table["time budget"]
    assert gm.every_n_val_epochs == 2 and cfg.sample.method == "ddpm"
    assert table["metrics"].startswith(
        f"in-loop FID@{gm.in_loop_num_samples} at every 2nd validation (every {2 * cfg.trainer.val_check_interval} "
        f"steps), FID@{gm.num_samples} at the end (ancestral sampling, {cfg.sample.steps} steps)")


def test_checked_on_names_hardware_and_dates_or_not_yet_run():
    table = _table("| what | section | hardware | date | result |")
    assert len(table) >= 8
    for what, (section, hardware, date, result) in table.items():
        assert what and section and hardware, what
        assert date == "not yet run" or re.fullmatch(r"\d{4}-\d{2}-\d{2}|every CI run.*", date), (what, date)
        if "GPU" in hardware and date != "not yet run":  # a GPU row that ran names its report
            assert re.search(r"results/gpu/\S+", result), (what, result)
    assert any("make gpu-check" in what and "GPU" in hardware for what, (_, hardware, _, _) in table.items())
