"""The whole seed in one command: collect, train, dream, judge, drive, then a report of what was measured.

    python pipeline.py --preset tiny --workdir /tmp/t      # every stage, a minute or two on a CPU
    python pipeline.py --preset small                      # -> runs/small/
    python pipeline.py --preset full --device cuda --workers 16
    python pipeline.py --preset small --force train_cost_model    # redo the judge, and the drive after it

Each stage runs as its own process (`python <stage>.py ...`) with explicit paths, so all it writes
lands under the work directory: data_race/, data_recovery/, data/ (each with summary.json), models/,
visuals/, output_dream.gif, drive.json, drive.mp4 (drive.gif without imageio-ffmpeg; --video), logs/<stage>.log,
drive_scores.png and report.md.
After the judge come ONPOLICY_ROUNDS rounds of learning from the MPC's own drives on training tracks
(drive_mpc.py --collect -> data_onpolicy{r}/, then train_predictor.py --init and train_cost_model.py on
all sources -> models/onpolicy{r}/). Then DAgger for the expert prior (the planner's first guess,
train_prior.py): the finished driver drives training tracks with every step labelled with the expert's action
(drive_mpc.py --collect -> data_dagger/) and the prior is retrained with them -> models/onpolicy{R}/dagger/,
as is the judge, with them among the MPC's own drives (not expert) -> models/onpolicy{R}/dagger/ too.
Both are draws: the driver with the retrained prior drives the same tracks again (-> data_prior_check/), and
the prior that drove them better, round 0's or the retrained one, is kept -> models/onpolicy{R}/prior_final.pth
(prior_choice.json says which); then the driver with that prior and the retrained judge drives them once more
(-> data_judge_check/), and the judge that drove them better, the round's or the retrained one, is kept
-> models/onpolicy{R}/cost_model_kept.pth (judge_choice.json). The final drive uses the last round's
predictor, the kept judge and the kept prior.
With --prior-rounds N, N rounds of DAgger of the prior alone come between the retrained prior and its check:
round r's prior drives training tracks without the planner (-> data_prior_alone{r}/) and is trained again on
the DAgger drives and every round's so far (-> models/onpolicy{R}/dagger/alone{r}/); the last is the one checked.
--hud goes to the encoder and --prior-steps to every training of the prior on labelled drives.
At small, the kept driver's mean on those tracks gates the run: under --gate (800) it trains again from the
encoder on with the seed + 1000 (the data kept; the attempt's models and drives moved to attempt{k}/), at most
--attempts times (3); the attempt with the best mean drives. attempts.json records each.
train_decoder.py runs beside train_encoder.py (on the second GPU when there are two; leave --device
at auto for that, since --device is passed to every stage).

Re-running resumes: a stage whose outputs all exist and are newer than its inputs is skipped.
--force STAGE (repeatable) reruns that stage; every later stage whose inputs it rewrote follows.
Only file times are compared, not flags: after changing --preset or --seed use another --workdir,
or --force the first stage that should change. --resume is passed to the encoder and predictor,
so an interrupted training continues from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gate import ATTEMPTS_FILE, attempt_notes, choose_judge, choose_prior, last_round, next_attempt
from presets import (DAGGER_DIR, DAGGER_MODELS, DATA_DIRS, DREAM_GIF, HUD_MODES, JUDGE_CHECK_DIR, JUDGE_CHOICE,
                     JUDGE_KEPT, MODELS_DIR, ONPOLICY_DIR, ONPOLICY_MODELS, ONPOLICY_ROUNDS, PRIOR_ALONE_DIR,
                     PRIOR_ALONE_MODELS, PRIOR_CHECK_DIR, PRIOR_CHOICE, VISUALS_DIR, common_parser, preset)
from report import read_json, write_report
from video import can_write_mp4, check_record_path

HERE = Path(__file__).resolve().parent


def stage_names(prior_rounds: int = 0) -> tuple[str, ...]:
    """In the seed's order, then the on-policy rounds, DAgger and its rounds of the prior alone (--prior-rounds);
    stages() builds them in this order."""
    return ("collect_race_data", "collect_recovery_data", "collect_data", "train_encoder", "train_predictor",
            "visualise_dream", "train_prior", "train_cost_model",
            *(f"{s}_onpolicy{r}" for r in range(1, ONPOLICY_ROUNDS + 1)
              for s in ("collect", "train_predictor", "train_cost_model")),
            "collect_dagger", "train_prior_dagger",
            *(f"{s}_prior_alone{r}" for r in range(1, prior_rounds + 1) for s in ("collect", "train")),
            "train_cost_model_dagger", "check_prior", "choose_prior", "check_judge", "choose_judge", "drive_mpc")


STAGES = stage_names()


def attempt_stages(names: tuple[str, ...]) -> tuple[str, ...]:
    """What another attempt of the gate redoes (the collected data are kept): the encoder on, the final drive last."""
    return names[names.index("train_encoder"):]

# A fine-tuning rate: restarting at the first training's 1e-3 undid what the drives taught (tuning tracks
# 500-511, mean score: 6 epochs at 1e-3 6.5, 8 epochs at 2e-4 70.1).
ONPOLICY_LR = 2e-4


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of every stage after the collectors in attempt k: --seed S + 1000 k."""
    return seed + 1000 * attempt


@dataclass
class Stage:
    name: str                                  # the script is <name>.py, its log logs/<name>.log
    argv: list[str]
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    beside: list[str] | None = None            # argv of train_decoder.py, run alongside this stage
    script: str | None = None                  # when not <name>.py (the on-policy rounds)
    clear: Path | None = None                  # folder emptied before the stage runs (drives of stale models)
    func: Callable[[], str] | None = None      # run in this process instead of a script; returns its log line


def newest(path: Path) -> int | None:
    """mtime (ns) of a file, or of the newest visible file in a folder; None when there is none.

    Hidden entries are skipped: the frame and latent caches later stages build in data/.cache are not data.
    """
    if path.is_dir():
        return max((p.stat().st_mtime_ns for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                   default=None)
    return path.stat().st_mtime_ns if path.exists() else None


def stale(inputs: list[Path], outputs: list[Path]) -> str | None:
    """Why a stage must run, or None when every output exists and is newer than every input."""
    made = {p: newest(p) for p in outputs}
    if missing := [p.name for p, t in made.items() if t is None]:
        return f"no {', '.join(missing)}"
    oldest = min(made, key=made.get)
    for p in inputs:
        t = newest(p)
        if t is None:
            return f"input {p} missing"
        if t > made[oldest]:
            return f"{p.name} is newer than {oldest.name}"
    return None


def drive_video(w: Path, choice: str) -> Path:
    """Where the final drive is recorded. auto: drive.mp4 where imageio-ffmpeg is installed, else drive.gif
    (a lent GPU machine had no ffmpeg: a whole run should not refuse to start over the video's format).
    An explicit mp4 without it fails here, before the first stage, not after the training."""
    if choice == "auto":
        choice = "mp4" if can_write_mp4() else "gif"
    path = w / f"drive.{choice}"
    check_record_path(str(path))
    return path


def stages(args, w: Path, attempt: int = 0) -> list[Stage]:
    m, v = w / MODELS_DIR, w / VISUALS_DIR
    data = {s: w / d for s, d in DATA_DIRS.items()}
    common = ["--preset", args.preset, "--device", args.device]
    common += ["--workers", str(args.workers)] if args.workers else []
    seeded = common + ["--seed", str(args.seed)]
    # Every stage after the collectors: another attempt draws other initialisations and training tracks.
    seed = attempt_seed(args.seed, attempt)
    train = common + ["--seed", str(seed)] + [a for s, d in data.items() for a in (f"--{s}-dir", str(d))]
    resume = ["--resume"] if args.resume else []
    hud = ["--hud", args.hud] if args.hud else []          # the encoder's; every later stage reads its config
    enc, pred, cost = m / "encoder_final.pth", m / "predictor_final.pth", m / "cost_model_final.pth"
    prior = m / "prior_final.pth"
    run = preset(args.preset)["pipeline"]
    cap = ["--max-steps", str(run["max_steps"])] if run["max_steps"] else []     # tiny cuts every drive short
    drive = ["--episodes", str(run["episodes"]), *cap]
    video = drive_video(w, args.video)
    # On-policy rounds: round r drives with round r-1's predictor and judge (round 0: the seed's), stores the
    # drives in data_onpolicy{r}/, and fine-tunes both on every source so far into models/onpolicy{r}/.
    models = lambda p, c: ["--encoder", str(enc), "--predictor", str(p), "--cost", str(c)]   # noqa: E731
    episodes, epochs, judge_epochs = run["onpolicy"]
    judge_args = ["--epochs", str(judge_epochs)] if judge_epochs else []
    onpolicy, pred_r, cost_r, own = [], pred, cost, []
    for r in range(1, ONPOLICY_ROUNDS + 1):
        d, out = w / f"{ONPOLICY_DIR}{r}", m / f"{ONPOLICY_MODELS}{r}"
        # Drives collected with the shooting planner and the full energy, by measurement (tuning tracks 500-511,
        # the round's models driving with iCEM): 375.5 +- 177.5 after shooting drives, 162.9 +- 130.6 after
        # iCEM drives. Round 0's judge has not seen the MPC's drives and cannot drive alone (0-9: -25.0).
        # Without the expert prior: the round was measured so, and it is the planner's own habits the judge
        # must learn to tell from the expert's.
        collect = common + ["--seed", str(seed + r), "--headless", *models(pred_r, cost_r), "--collect", str(d),
                            "--planner", "shooting", "--w-progress", "1", "--w-road", "1", "--prior", "none",
                            "--episodes", str(episodes), *cap]
        own.append(d)
        mine = train + ["--onpolicy-dirs", *map(str, own), "--encoder", str(enc)]
        onpolicy += [
            Stage(f"collect_onpolicy{r}", collect, [enc, pred_r, cost_r], [d / "summary.json"], script="drive_mpc",
                  clear=d),
            Stage(f"train_predictor_onpolicy{r}", mine + ["--init", str(pred_r), "--epochs", str(epochs),
                                                          "--lr", str(ONPOLICY_LR),
                                                          "--out-dir", str(out)],
                  [enc, pred_r, *data.values(), *own], [out / "predictor_final.pth", out / "predictor_stats.jsonl"],
                  script="train_predictor"),
            Stage(f"train_cost_model_onpolicy{r}", mine + ["--predictor", str(out / "predictor_final.pth"),
                                                           *judge_args, "--out-dir", str(out)],
                  [enc, out / "predictor_final.pth", *data.values(), *own],
                  [out / "cost_model_final.pth", out / "cost_model_stats.json"], script="train_cost_model")]
        pred_r, cost_r = out / "predictor_final.pth", out / "cost_model_final.pth"
    # DAgger for the prior: the finished driver (the last round's models, round 0's prior) drives training
    # tracks, each step labelled with what the expert would do there; the prior is retrained with them too
    # (into dagger/), and so is the judge. The driver with that prior drives the same tracks (the same --seed)
    # again, and the prior that drove them better goes to the last round's folder, where drive_mpc.py looks for
    # it first; then, with the kept prior, the same for the judge.
    dag, check, judged, last = w / DAGGER_DIR, w / PRIOR_CHECK_DIR, w / JUDGE_CHECK_DIR, last_round(w)
    retrained, kept = last / DAGGER_MODELS / "prior_final.pth", last / "prior_final.pth"
    steps = ["--onpolicy-steps", args.prior_steps]
    judge_again, final_judge = last / DAGGER_MODELS / "cost_model_final.pth", last / JUDGE_KEPT
    # The DAgger round's training tracks (its rounds of the prior alone: the next seeds), the last round's models.
    on_tracks = lambda judge, r=0: ["--seed", str(seed + ONPOLICY_ROUNDS + 1 + r), "--headless",   # noqa: E731
                                    *models(pred_r, judge), "--episodes", str(run["dagger"]), *cap]
    tracks = on_tracks(cost_r)
    dagger = [
        Stage("collect_dagger", common + tracks + ["--prior", str(prior), "--collect", str(dag)],
              [enc, pred_r, cost_r, prior], [dag / "summary.json"], script="drive_mpc", clear=dag),
        Stage("train_prior_dagger", train + ["--encoder", str(enc), "--onpolicy-dirs", str(dag), *steps,
                                             "--out-dir", str(retrained.parent)],
              [enc, *data.values(), dag], [retrained, retrained.parent / "prior_stats.json"], script="train_prior")]
    # Rounds of DAgger of the prior alone (README, "Session 43"): round r's prior drives training tracks of its
    # own without the planner, every step labelled by the expert, and the prior is trained again on the
    # finished driver's drives and every round's so far. The last round's prior is the one the check drives.
    alone = [dag]
    for r in range(1, args.prior_rounds + 1):
        d, out = w / f"{PRIOR_ALONE_DIR}{r}", last / DAGGER_MODELS / f"{PRIOR_ALONE_MODELS}{r}"
        alone.append(d)
        dagger += [
            Stage(f"collect_prior_alone{r}", common + on_tracks(cost_r, r) + ["--policy", "prior", "--prior",
                                                                             str(retrained), "--collect", str(d)],
                  [enc, pred_r, cost_r, retrained], [d / "summary.json"], script="drive_mpc", clear=d),
            Stage(f"train_prior_alone{r}", train + ["--encoder", str(enc), "--onpolicy-dirs", *map(str, alone),
                                                    *steps, "--out-dir", str(out)],
                  [enc, *data.values(), *alone], [out / "prior_final.pth", out / "prior_stats.json"],
                  script="train_prior")]
        retrained = out / "prior_final.pth"
    dagger += [
        # The judge again, with the finished driver's drives among its own (not expert): a second round of
        # adversarial imitation without a second round of drives (README, "Session 29"). The prior's check
        # drives with the round's judge, as the DAgger drives did, so only the prior differs.
        Stage("train_cost_model_dagger", train + ["--encoder", str(enc), "--onpolicy-dirs", *map(str, [*own, dag]),
                                                  "--predictor", str(pred_r), *judge_args,
                                                  "--out-dir", str(judge_again.parent)],
              [enc, pred_r, *data.values(), *own, dag], [judge_again, judge_again.parent / "cost_model_stats.json"],
              script="train_cost_model"),
        Stage("check_prior", common + tracks + ["--prior", str(retrained), "--collect", str(check)],
              [enc, pred_r, cost_r, retrained], [check / "summary.json"], script="drive_mpc", clear=check),
        Stage("choose_prior", [], [dag, check, prior, retrained], [kept, last / PRIOR_CHOICE],
              func=lambda: choose_prior(w, last, retrained)),
        Stage("check_judge", common + on_tracks(judge_again) + ["--prior", str(kept), "--collect", str(judged)],
              [enc, pred_r, judge_again, kept], [judged / "summary.json"], script="drive_mpc", clear=judged),
        Stage("choose_judge", [], [judged, last / PRIOR_CHOICE, cost_r, judge_again],
              [final_judge, last / JUDGE_CHOICE], func=lambda: choose_judge(w, last))]
    collectors = [Stage(script, seeded + ["--out-dir", str(data[s])],
                        outputs=[data[s] / "summary.json"])
                  for script, s in (("collect_race_data", "race"), ("collect_recovery_data", "recovery"),
                                    ("collect_data", "random"))]
    return collectors + [
        # The watcher looks for checkpoints every second (not 5), so the last epoch follows the encoder closely.
        Stage("train_encoder", train + ["--out-dir", str(m)] + hud + resume, list(data.values()),
              [enc, m / "encoder_probes.json", m / "encoder_loss.png", m / "decoder.pth", v / "decoder_stats.jsonl"],
              beside=train + ["--models-dir", str(m), "--out-dir", str(v), "--poll", "1"]),
        Stage("train_predictor", train + ["--encoder", str(enc), "--out-dir", str(m)] + resume,
              [enc, *data.values()], [pred, m / "predictor_stats.jsonl", m / "predictor_horizon.png",
                                      m / "predictor_probes.json"]),
        Stage("visualise_dream", train + ["--encoder", str(enc), "--predictor", str(pred), "--decoder",
                                          str(m / "decoder.pth"), "--out-dir", str(w), "--out", DREAM_GIF],
              [enc, pred, m / "decoder.pth", *data.values()], [w / DREAM_GIF]),
        Stage("train_prior", train + ["--encoder", str(enc), "--out-dir", str(m)], [enc, *data.values()],
              [prior, m / "prior_stats.json"]),
        Stage("train_cost_model", train + ["--encoder", str(enc), "--predictor", str(pred), "--out-dir", str(m)],
              [enc, pred, *data.values()], [cost, m / "cost_model_stats.json"]),
        *onpolicy,
        *dagger,
        # Fixed evaluation seeds 0..E-1 whatever --seed is, so scores of different runs compare.
        Stage("drive_mpc", common + ["--headless", "--seed", "0", *models(pred_r, final_judge), "--prior",
                                     str(kept), *drive, "--json", str(w / "drive.json"), "--record", str(video)],
              [enc, pred_r, final_judge, kept], [w / "drive.json", video]),
    ]


def start(name: str, argv: list[str], logs: Path, threads: int | None = None,
          script: str | None = None) -> subprocess.Popen:
    """Start <script or name>.py with stdout and stderr to logs/<name>.log (and `threads` CPU threads, if given)."""
    cmd = [sys.executable, str(HERE / f"{script or name}.py"), *argv]
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(logs / f"{name}.log", "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n\n")
        log.flush()
        # cwd is the work directory, so a path a script still takes from its defaults lands there, not in the repo.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=logs.parent, env=env)


def check(proc: subprocess.Popen, name: str, logs: Path) -> None:
    if (rc := proc.wait()) != 0:
        raise SystemExit(f"stage {name} failed with exit code {rc}; see {logs / f'{name}.log'}")


def run_stage(stage: Stage, w: Path, resume: bool, grace_s: float) -> str | None:
    """Run one stage (and its companion); exit naming the stage if it fails. Returns a note for the report."""
    logs = w / "logs"
    if stage.clear is not None:
        shutil.rmtree(stage.clear, ignore_errors=True)
    if stage.func is not None:
        line = stage.func()
        print(f"  {line}", flush=True)
        (logs / f"{stage.name}.log").write_text(line + "\n")
        return None
    if stage.beside is None:
        check(start(stage.name, stage.argv, logs, script=stage.script), stage.name, logs)
        return None
    m, v = w / MODELS_DIR, w / VISUALS_DIR
    # A fresh encoder run starts from a clean slate, so the watcher shows only this run's epochs (under
    # --resume the epoch checkpoints stay: the encoder continues from them).
    old = [m / "encoder_final.pth"]
    if not resume:
        old += [*m.glob("encoder_mixed_ep*.pth"), m / "decoder.pth", v / "decoder_stats.jsonl",
                *v.glob("reconstruct_ep*.png")]
    for p in old:
        p.unlink(missing_ok=True)
    # Encoder and watcher share the CPU cores: competing OpenMP pools were measured 4-70x slower.
    half = max(1, (os.cpu_count() or 1) // 2)
    watcher = start("train_decoder", stage.beside, logs, threads=half)
    try:
        check(start(stage.name, stage.argv, logs, threads=half), stage.name, logs)
        try:
            watcher.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:                    # killed in `finally`
            note = (f"train_decoder did not stop within {grace_s:.0f} s after the encoder finished and was killed; "
                    f"the reconstructions may miss the last epochs (see {logs / 'train_decoder.log'})")
            print(f"  warning: {note}", flush=True)
            return note
        check(watcher, "train_decoder", logs)
        return None
    finally:
        if watcher.poll() is None:             # overran, or the encoder failed or was interrupted: nothing to watch
            watcher.kill()
            watcher.wait()


# ---------------------------------------------------------------- main
def main(args):
    w = Path(args.out_dir or f"runs/{args.preset}").resolve()
    run = preset(args.preset)["pipeline"]
    line, tries = run["gate"]
    line = args.gate if args.gate is not None else line
    tries = args.attempts or tries
    attempts = (read_json(w / ATTEMPTS_FILE) or []) if line is not None else []
    here = next((a for a in attempts if a["where"] == "."), None)
    k = here["attempt"] if here else len(attempts)
    plan = stages(args, w, k)                    # checks the video's format now, not after the training
    names = tuple(s.name for s in plan)
    redo = attempt_stages(names)
    forced = set(args.force or [])
    if unknown := sorted(forced - set(names)):
        raise SystemExit(f"--force {', '.join(unknown)}: no such stage in this run; its stages: {', '.join(names)}")
    (w / "logs").mkdir(parents=True, exist_ok=True)
    timings_path = w / "logs" / "timings.json"
    timings = read_json(timings_path) or {}
    status, notes = {}, []
    todo = list(plan)
    while todo:
        stage = todo.pop(0)
        why = "forced" if stage.name in forced else stale(stage.inputs, stage.outputs)
        if why is None:
            status[stage.name] = "skipped"
            print(f"{stage.name:<28} skipped (outputs up to date)", flush=True)
        else:
            print(f"{stage.name:<28} running ({why}) ...", flush=True)
            t0 = time.perf_counter()
            if note := run_stage(stage, w, args.resume, run["decoder_grace_s"]):
                notes.append(note)
            timings[stage.name] = round(time.perf_counter() - t0, 1)
            status[stage.name] = "ran"
            # Saved after every stage, so the report of a later, resumed run still has the times.
            timings_path.write_text(json.dumps(timings, indent=1))
            print(f"{stage.name:<28} ran in {timings[stage.name]:.1f} s", flush=True)
        # The gate, before the final drive: a run under the line trains again from the encoder on.
        if stage.name == "choose_judge" and line is not None:
            # This attempt's stages before the drive (timings.json keeps the last run of each: this attempt's).
            spent = sum(timings.get(s, 0) for s in redo[:-1])
            if next_attempt(w, attempts, k, attempt_seed(args.seed, k), line, tries, spent):
                k += 1
                todo = [s for s in stages(args, w, k) if s.name in redo]
            else:
                # The attempt that drives may be an earlier one put back with its logs: its stage times, not
                # those of the attempt that ran last, go to timings.json and the report.
                timings = read_json(timings_path) or {}
    notes += attempt_notes(attempts, line) if attempts else []
    drives = [*(f"{ONPOLICY_DIR}{r}" for r in range(1, ONPOLICY_ROUNDS + 1)), DAGGER_DIR,
              *(f"{PRIOR_ALONE_DIR}{r}" for r in range(1, args.prior_rounds + 1)), PRIOR_CHECK_DIR, JUDGE_CHECK_DIR]
    write_report(w, args.preset, status, timings, notes, drives, run["max_steps"])
    print(f"report: {w / 'report.md'}")


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", dest="out_dir", metavar="DIR",
                   help="where everything goes (default: runs/<preset>); the same as --out-dir")
    p.add_argument("--force", action="append", metavar="STAGE",
                   help=f"rerun this stage even if its outputs are up to date (repeatable): {', '.join(STAGES)}, "
                        "and with --prior-rounds N collect_prior_alone{r} and train_prior_alone{r}, r = 1..N")
    p.add_argument("--gate", type=float, default=None, metavar="SCORE",
                   help="the DAgger drives' mean a run must reach, or it trains again from the encoder with "
                        "another seed (default: the preset's; small 800, none for tiny and full)")
    p.add_argument("--attempts", type=int, default=None,
                   help="most runs from the encoder on under --gate; the best is kept (default: the preset's, "
                        "small 3)")
    g = p.add_argument_group("recipe (README, \"Session 43\" and \"Session 45\")")
    g.add_argument("--hud", choices=HUD_MODES, default=None,
                   help="what the encoder blanks of the heads-up display (train_encoder.py --hud; default: its "
                        "default, mask_score); mask_steer blanks the steering gauge too, which one run's prior copied")
    g.add_argument("--prior-steps", choices=("all", "forward"), default="all",
                   help="which steps of the drives labelled by the expert the prior learns from (train_prior.py "
                        "--onpolicy-steps): all, or forward: on the road and facing along the track")
    g.add_argument("--prior-rounds", type=int, default=0, metavar="N",
                   help="rounds of DAgger of the prior alone after the DAgger round, each on as many training "
                        "tracks as that round; the last round's prior is the one the prior's check drives with")
    p.add_argument("--video", choices=("auto", "mp4", "gif"), default="auto",
                   help="the final drive's recording: mp4 (needs imageio-ffmpeg), gif, or auto: mp4 where "
                        "imageio-ffmpeg is installed, else gif")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
