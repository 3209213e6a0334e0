"""The one place for presets, default paths, shared CLI flags, device choice and atomic writes.

Every script builds its parser with `common_parser(stage)` and then calls `resolve(args, stage)`:
preset values fill in every flag the user did not give, so

    python collect_race_data.py --preset small --workers 2

means "the small preset, but with two workers". `full` is the seed's scale.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

# Control period k: the policy picks a new action every K env frames (50 fps) and holds it.
# Chosen by measurement (README, "control period"): the expert still scores > 900 at k=4,
# the planner gets k x 20 ms = 80 ms per decision in real time, and a 15-step dream covers
# 60 frames = 1.2 s, enough to see a corner coming before braking for it.
CONTROL_PERIOD = 4

# What models.prepare_frames can do with the heads-up display (train_encoder.py --hud, pipeline.py --hud).
HUD_MODES = ("keep", "mask_score", "mask_steer", "mask")

# Default folders, as in the seed: collectors write here, trainers read from here.
DATA_DIRS = {"race": "data_race", "recovery": "data_recovery", "random": "data"}
# The MPC's own drives on training tracks (drive_mpc.py --collect), one folder per round: the world model
# learns the states its planner really visits (DAgger-style aggregation, Ross et al. 2011). Optional:
# only the predictor and the judge read them, through --onpolicy-dirs.
ONPOLICY_DIR = "data_onpolicy"
# Rounds of learning from the MPC's own drives (pipeline.py): each collects drives with the latest predictor
# and judge, then fine-tunes both on all data so far (README, "Learning from its own drives"). Measured on
# tuning tracks 500-511 at `small`: one round lifted the mean score, a second one made the car stop and wait
# (twice, with two recipes), so one round it is.
ONPOLICY_ROUNDS = 1
# The finished driver's drives on training tracks, every step labelled with the expert's action: the prior
# learns from them too (train_prior.py --onpolicy-dirs; pipeline.py's DAgger round).
DAGGER_DIR = "data_dagger"
# The prior retrained on them is a draw that can cost as much as it gives (README, "Which prior drives"), so
# the finished driver with it drives the DAgger round's tracks again (PRIOR_CHECK_DIR) before it is kept:
# pipeline.py trains it into MODELS_DIR/onpolicy{R}/DAGGER_MODELS/ and copies the prior that drove those
# tracks better to MODELS_DIR/onpolicy{R}/prior_final.pth, where drive_mpc.py looks first.
PRIOR_CHECK_DIR = "data_prior_check"
# pipeline.py --prior-rounds: the prior's own drives on training tracks, round r in PRIOR_ALONE_DIR{r}, every step
# labelled by the expert, and the prior trained again with them in MODELS_DIR/onpolicy{R}/DAGGER_MODELS/
# PRIOR_ALONE_MODELS{r}/ (README, "Session 43").
PRIOR_ALONE_DIR = "data_prior_alone"
PRIOR_ALONE_MODELS = "alone"
# The DAgger round's models: the retrained prior, and the judge trained again with the DAgger drives among
# the MPC's own (not expert).
DAGGER_MODELS = "dagger"
PRIOR_CHOICE = "prior_choice.json"         # beside the kept prior: both means and which prior was kept
# That judge is a draw too (the figures: gate.choose_judge; README, "Which judge drives"). So the driver with
# the kept prior and it drives the DAgger round's tracks once more (JUDGE_CHECK_DIR), and the judge that drove
# them better, the round's or the retrained one, is copied to MODELS_DIR/onpolicy{R}/JUDGE_KEPT, where
# drive_mpc.py looks first.
JUDGE_CHECK_DIR = "data_judge_check"
JUDGE_KEPT = "cost_model_kept.pth"
JUDGE_CHOICE = "judge_choice.json"         # beside the kept judge: both means and which judge was kept
SOURCES = (*DATA_DIRS, "onpolicy")
MODELS_DIR = "models"
# Each on-policy round's predictor and judge: MODELS_DIR/onpolicy{r}/ (pipeline.py writes, drive_mpc.py reads).
ONPOLICY_MODELS = "onpolicy"
VISUALS_DIR = "visuals"
DREAM_GIF = "output_dream.gif"             # visualise_dream.py's GIF in a pipeline work directory

# Track seeds below this are reserved for evaluation (drive_mpc.py --seed S);
# collectors never drive them, so every reported score is on unseen tracks.
EVAL_SEED_LIMIT = 1_000_000

# Rows are control steps (one stored frame per decision). `frames` is a per-source target;
# `max_steps` caps control steps per episode (None: the env's own 1000-frame limit).
# Each stage reads its own sub-dict (e.g. PRESETS["small"]["encoder"]) through apply_preset().
# pipeline: what pipeline.py runs around the stages (README, "The pipeline").
#   episodes, max_steps: the final drive, tracks 0..episodes-1 (never in the collected data); tiny cuts each
#   drive short (max_steps control steps), so its score checks that the pipeline works, not how well the car drives.
#   decoder_grace_s: how long the decoder watcher may take, once the encoder is done, to show its last epochs.
#   onpolicy: (drives collected per round, predictor fine-tuning epochs per round at pipeline.ONPOLICY_LR, the
#   round judge's epochs or None for the preset's). Measured at small on tuning tracks 500-511 after the round:
#   32 drives 449.7 +- 232.1 against 16 drives 375.5 +- 177.5; with the 32 drives, a judge trained 4 epochs
#   609.1 +- 149.5 against 20 (the preset's) 449.7 +- 232.1: a discriminator trained to the end overfits the
#   few on-policy drives and scores every dream as far from expert. Full keeps its preset (not measured).
#   dagger: drives of the finished driver whose expert-labelled steps retrain the prior (README, "The expert
#   prior"; 32 measured at small, full's 200 not measured).
#   gate: (line, attempts). The DAgger drives are the finished driver on training tracks, and their mean ranks
#   runs as their cars score where the encoder's probes did not (README, "A gate on the DAgger drives"): over
#   twelve cars (runs and redrawn encoders), Spearman 0.81 against the score on tracks 0-9; the two runs at
#   848.2 and 866.3 scored 841-900 over tracks 0-99, the ten under 800 270-723 on 0-9. The gate reads the mean
#   of the driver that will drive, with the prior kept by gate.choose_prior, on those tracks. A run under
#   the line trains again from the encoder with another seed (the data kept); after `attempts` tries the
#   attempt with the best mean is kept. Tiny's drives are cut short and full's not measured.
PRESETS: dict[str, dict] = {
    "tiny": {
        "frames": {"race": 80, "recovery": 80, "random": 80},
        "max_steps": 40,
        "encoder": {"width": 8, "latent": 32, "expander": 64, "epochs": 2, "batch_size": 24,
                    "batches_per_epoch": 3, "probe_frames": 200},
        "decoder": {"width": 8, "steps": 5, "batch_size": 24},
        "predictor": {"hidden": 64, "layers": 2, "epochs": 2, "batch_size": 32, "batches_per_epoch": 5},
        "cost": {"hidden": 32, "epochs": 2},
        "prior": {"hidden": 32, "members": 1, "epochs": 2},
        "pipeline": {"episodes": 1, "max_steps": 30, "decoder_grace_s": 300, "onpolicy": (2, 1, None), "dagger": 2,
                     "gate": (None, 1)},
    },
    "small": {
        "frames": {"race": 6_000, "recovery": 6_000, "random": 6_000},
        "max_steps": None,
        "encoder": {"width": 16, "latent": 128, "expander": 512, "epochs": 6, "batch_size": 128,
                    "batches_per_epoch": None, "probe_frames": 6000},
        "decoder": {"width": 16, "steps": 200, "batch_size": 64},
        "predictor": {"hidden": 256, "layers": 2, "epochs": 20, "batch_size": 256, "batches_per_epoch": 100},
        "cost": {"hidden": 128, "epochs": 20},
        "prior": {"hidden": 256, "members": 1, "epochs": 30},
        "pipeline": {"episodes": 10, "max_steps": None, "decoder_grace_s": 1800, "onpolicy": (32, 8, 4),
                     "dagger": 32, "gate": (800.0, 3)},
    },
    "full": {
        # The seed's volumes: ~1.9M expert, ~2.4M recovery, ~1.5M random frames; the seed's ResNet18.
        "frames": {"race": 1_900_000, "recovery": 2_400_000, "random": 1_500_000},
        "max_steps": None,
        "encoder": {"width": 64, "latent": 512, "expander": 2048, "epochs": 50, "batch_size": 256,
                    "batches_per_epoch": None, "probe_frames": 50_000},
        "decoder": {"width": 64, "steps": 1000, "batch_size": 128},
        "predictor": {"hidden": 1024, "layers": 3, "epochs": 30, "batch_size": 1024, "batches_per_epoch": None},
        "cost": {"hidden": 512, "epochs": 10},
        "prior": {"hidden": 512, "members": 1, "epochs": 10},
        "pipeline": {"episodes": 20, "max_steps": None, "decoder_grace_s": 4 * 3600, "onpolicy": (200, 8, None),
                     "dagger": 200, "gate": (None, 1)},
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def apply_preset(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Fill every flag of `stage` the user left unset (None) from the chosen preset."""
    for key, value in preset(args.preset)[stage].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, except where the help already says what the default is
    (flags whose None means "the preset's" or "derived"), so --help never reads "(default: ...) (default: None)"."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags every script shares, with the same names and meanings everywhere."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("common")
    g.add_argument("--preset", default="small", choices=sorted(PRESETS),
                   help="scale of the run; explicit flags override its values")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--seed", type=int, default=0, help="base seed of the run")
    g.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes (default: CPU cores, at most 32)")
    g.add_argument("--out-dir", default=None, help="where this stage writes its outputs")
    g.add_argument("--resume", action="store_true",
                   help="continue from what an earlier run of this stage left on disk")
    return p


def add_data_args(parser: argparse.ArgumentParser):
    """The data folders and the held-out share, the same for every training stage; returns the group."""
    g = parser.add_argument_group("data")
    for source, folder in DATA_DIRS.items():
        g.add_argument(f"--{source}-dir", default=folder, help=f"folder of the {source} episodes")
    g.add_argument("--onpolicy-dirs", nargs="*", default=[],
                   help="folders of the MPC's own drives (drive_mpc.py --collect); each is one more source")
    g.add_argument("--val-frac", type=float, default=0.1, help="share of episodes held out (split by episode)")
    return g


def add_head_args(parser: argparse.ArgumentParser):
    """Training flags of the small networks on frozen latents (the judge, the expert prior); returns the group.
    hidden and epochs come from the preset when not given."""
    g = parser.add_argument_group("training")
    g.add_argument("--hidden", type=int, default=None, help="hidden width")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    return g


def data_dirs(args: argparse.Namespace) -> dict[str, str]:
    """{source: folder} from the flags add_data_args() made: the three sources, then onpolicy1, onpolicy2, ..."""
    dirs = {source: getattr(args, f"{source}_dir") for source in DATA_DIRS}
    dirs.update({f"onpolicy{i}": d for i, d in enumerate(getattr(args, "onpolicy_dirs", None) or [], 1)})
    return dirs


def pick_device(name: str = "auto") -> str:
    """`auto` picks cuda (NVIDIA, and AMD under ROCm, which PyTorch also calls cuda), then mps, then cpu."""
    if name != "auto":
        return name
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def onpolicy_rounds(models_dir, *files: str) -> list[Path]:
    """The folders MODELS_DIR/onpolicy{r}/ that hold every one of `files`, in round order (2 before 10)."""
    found = [(int(d.name[len(ONPOLICY_MODELS):]), d) for d in Path(models_dir).glob(f"{ONPOLICY_MODELS}*")
             if d.name[len(ONPOLICY_MODELS):].isdigit() and all((d / f).exists() for f in files)]
    return [d for _, d in sorted(found)]


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation; True where it applied (Linux glibc).

    Each MPC decision allocates and frees hundreds of activations of a few hundred KB to a few MB. glibc
    hands such blocks back to the kernel (mmap / heap trimming) and every new one page-faults again:
    measured at the small size on the 2-core development machine, 500-16,000 page faults a decision and
    medians of 75-101 ms without this, under 50 faults and 73-77 ms with it (README, "Planning time").
    PyTorch's performance tuning guide recommends an allocator that reuses memory (jemalloc, tcmalloc) on
    CPUs for this reason; mallopt gives glibc that behaviour without preloading a library. Elsewhere: a no-op.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                         # not glibc (macOS, Windows, musl without it)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3               # <malloc.h> parameter numbers
    # Blocks up to 32 MiB (glibc's own ceiling for its adaptive threshold on 64-bit; a full-size energy pass
    # is ~20 MB) come from the heap, and up to 1 GiB of free heap stays mapped for reuse.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temporary file next to `path`, then rename it into place.

    A run killed halfway leaves at most a hidden `.tmp` file, never a truncated `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)                                  # mkstemp makes 0600; outputs are for sharing
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
