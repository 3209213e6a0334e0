"""Drive and evaluate: the energy-based MPC (the seed's final phase), or the expert for reference.

    python drive_mpc.py                                   # MPC with the newest models, window if a display
    python drive_mpc.py --episodes 10 --seed 0 --json mpc.json --record drive.mp4
    python drive_mpc.py --planner shooting                # the seed's best-of-1,000 instead of iterative CEM
    python drive_mpc.py --policy expert --episodes 20 --seed 0 --json expert.json
    python drive_mpc.py --prior none                      # no expert prior: plans from the shifted last plan only
    python drive_mpc.py --policy prior                    # the expert prior alone, no world model (ablation)
    python drive_mpc.py --compile off                     # skip torch.compile's half minute; plans slower
    python drive_mpc.py --episodes 10 --seed 0 --save-episodes drives   # keep every drive, step by step
    python drive_mpc.py --collect data_onpolicy1 --planner shooting --w-progress 1 --w-road 1 --prior none \
        --episodes 32 --seed 1

Drives track seeds S..S+N-1 (seeds below 1,000,000 never appear in collected data, so these are
unseen tracks), prints each score and the mean +- std, and with --json writes {"scores", "mean",
"std", "tiles_fraction", "lap_finished", "seeds", "plan_ms_median", "plan_ms_p95", ...}.
With --collect DIR it drives training tracks instead (seeds >= 1,000,000, derived from --seed like the
collectors') and stores the episodes in the episode format: data for the next round of the predictor and
the judge (train_predictor.py --onpolicy-dirs DIR --init ...), so they learn the states the planner
really reaches (measured on tuning tracks: README, "Learning from its own drives"). Without --predictor,
--cost and --prior it uses those of the last round, models/onpolicy{r}/, where there is one, else models/
(the judge pipeline.py kept there, the round's or the one trained again with the DAgger drives).
Every collected step is labelled with the expert's action for that state (episode format): with the prior
driving too, these drives retrain the prior (train_prior.py --onpolicy-dirs; pipeline.py's DAgger stage), and
so may drives of the prior alone (--policy prior --collect DIR; README, "Session 35").

Each control step the MPC (planner.py) encodes the camera frame, dreams 1,000 action sequences of 15
steps through the predictor in one batch, sums the energy of every predicted transition, and executes the
first action of the lowest-energy sequence for one control period, warm-started from its prior's dream.
Only the camera frame reaches the MPC: run_episode gives the simulator to privileged policies only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from carenv import Expert, make_env, run_episode
from data_loader import episode_name, write_episode
from planner import MPCPolicy, PriorPolicy, plan_dtype
from presets import (CONTROL_PERIOD, JUDGE_KEPT, MODELS_DIR, atomic_write, common_parser, default_workers,
                     onpolicy_rounds, pick_device)
from video import Recorder, check_record_path


def load_mpc(spec: dict):
    """Build the MPC from checkpoints; a missing or mismatched one names the stage to run."""
    import torch
    from models import CheckpointError, build, load_checkpoint
    from train_predictor import file_hash
    device = torch.device(pick_device(spec["device"]))
    enc_ckpt = load_checkpoint(spec["encoder"], "encoder", device, stage="train_encoder.py")
    pred_ckpt = load_checkpoint(spec["predictor"], "predictor", device, stage="train_predictor.py")
    cost_ckpt = load_checkpoint(spec["cost"], "cost", device, stage="train_cost_model.py")
    prior_ckpt = load_checkpoint(spec["prior"], "prior", device, stage="train_prior.py") if spec["prior"] else None
    key = file_hash(spec["encoder"])
    trained = [(pred_ckpt, "train_predictor.py"), (cost_ckpt, "train_cost_model.py")]
    for ckpt, stage in trained + ([(prior_ckpt, "train_prior.py")] if prior_ckpt else []):
        if ckpt.get("encoder_hash") != key:
            raise CheckpointError(f"{stage.replace('train_', '').replace('.py', '')} checkpoint was trained on "
                                  f"another encoder than {spec['encoder']}: run {stage} again")
    if cost_ckpt.get("predictor_hash", file_hash(spec["predictor"])) != file_hash(spec["predictor"]):
        raise CheckpointError(f"the cost model learned from another predictor's dreams than {spec['predictor']}: "
                              "run train_cost_model.py again")
    prior = build(prior_ckpt, device) if prior_ckpt else None
    return MPCPolicy(build(enc_ckpt, device), build(pred_ckpt, device), build(cost_ckpt, device), device,
                     prior=prior, **spec["mpc"])


class OnPolicyDriver:
    """The MPC as a collector's policy, made for each episode inside the worker process
    (collection.run_collection); the MPC itself is built (and compiled) once per process, by `_driver`."""

    privileged = False

    def __init__(self, spec: dict, threads: int = 1):
        import torch
        torch.set_num_threads(threads)
        self.mpc = _driver(spec)

    def reset(self, rng: np.random.Generator) -> None:
        self.mpc.reset(rng)

    def act(self, frame: np.ndarray, sim=None):
        action, _ = self.mpc.act(frame)
        return action, {}                          # the episode format has no energy column


_BUILT: dict = {}                                   # this process's last driver, by its spec and files


def uncompiled(spec: dict) -> dict:
    """The same driver spec with --compile off: for checking the checkpoints, and for the prior alone."""
    return {**spec, "mpc": {**spec["mpc"], "compile": "off"}}


def _driver(job: dict):
    """The policy of an evaluation job or a collector's episode: the expert, new each time; the MPC or the prior
    alone, built once per process and reused while the spec and its checkpoint files stay the same (compiling
    takes half a minute)."""
    if job["policy"] == "expert":
        return Expert()
    files = [job[k] for k in ("encoder", "predictor", "cost", "prior") if job[k]]
    # Which file each path holds, too: a checkpoint rewritten in place (a new file, os.replace'd) is a new driver.
    stats = [(f, st.st_ino, st.st_mtime_ns) for f, st in zip(files, map(os.stat, files))]
    key = json.dumps([{k: job[k] for k in ("policy", "device", "mpc")}, stats])
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = load_mpc(job) if job["policy"] == "mpc" else PriorPolicy(load_mpc(uncompiled(job)))
    return _BUILT[key]


def _drive(job: dict) -> dict:
    """One evaluation episode (in a worker process, or inline with --workers 1)."""
    if job["threads"]:
        import torch
        torch.set_num_threads(job["threads"])
    policy = _driver(job)
    env = make_env("human" if job["render"] else None)
    recorder = Recorder(job["record"]) if job["record"] else None
    t0 = time.perf_counter()
    ep = run_episode(env, policy, job["seed"], k=CONTROL_PERIOD, max_steps=job["max_steps"], on_frame=recorder)
    env.close()
    if recorder:
        recorder.save()
    if job["save_episodes"]:
        save_drive(job["save_episodes"], job["seed"], job["policy"], ep)
    return {"seed": job["seed"], **episode_summary(ep), "seconds": time.perf_counter() - t0,
            "compiled": bool(getattr(policy, "compiled", False))}


def save_drive(folder: str, seed: int, policy: str, ep: dict) -> None:
    """Write one evaluation drive in the episode format (frames, actions, the expert's label for every step,
    simulator state), named by its track seed, for looking into what happened where (README, "Why the car
    leaves the road"). These are evaluation tracks: keep the folder out of training."""
    rows = len(ep["obs"])
    meta = {"source": "evaluation", "track_seed": seed, "policy": policy, "score": ep["score"],
            "lap_finished": ep["lap_finished"], "tiles_fraction": ep["tiles_fraction"], "k": CONTROL_PERIOD}
    write_episode(Path(folder) / episode_name(seed, 0, rows), ep, meta)


def episode_summary(ep: dict) -> dict:
    """Per-episode figures from run_episode's arrays (simulator state: evaluation only, never planning).

    wrong_way_share: control steps on the road facing against the track (|heading error| > pi/2). A frame
    shows which way the track runs only faintly (probes.facing_forward), so after a spin the car can
    drive the lap backwards, on the road and looking like the expert, reaching no new tiles.
    steer_change: the mean |change of steering| from one control step to the next; label_steer_change the
    same for the expert's labels in the states the car visited: how much more the car saws at the wheel.
    """
    import torch
    from probes import facing_forward
    backwards = ~facing_forward(torch.from_numpy(np.asarray(ep["heading_err"]))).numpy()
    r = {"score": ep["score"], "tiles_fraction": ep["tiles_fraction"], "lap_finished": ep["lap_finished"],
         "steps": len(ep["obs"]), "off_road_share": float(1 - ep["on_road"].mean()),
         "wrong_way_share": float((ep["on_road"] & backwards).mean()),
         "median_speed": float(np.median(ep["speed"])),
         **{name: float(np.abs(np.diff(ep[key][:, 0])).mean()) if len(ep[key]) > 1 else 0.0
            for name, key in (("steer_change", "action"), ("label_steer_change", "expert_action"))}}
    if "plan_ms" in ep:
        r["plan_ms"] = ep["plan_ms"].tolist()
    return r


def evaluate(base: dict, seeds: list[int], workers: int = 1) -> dict:
    jobs = [{**base, "seed": s, "record": base["record"] if i == 0 else None} for i, s in enumerate(seeds)]
    results = []
    if workers > 1:
        jobs = [{**j, "threads": max(1, (os.cpu_count() or 1) // workers)} for j in jobs]
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap(_drive, jobs):
                results.append(r)
                _print(r)
    else:
        for job in jobs:
            results.append(_drive(job))
            _print(results[-1])
    scores = np.array([r["score"] for r in results])
    report = {"policy": base["policy"], "seeds": seeds, "scores": scores.round(2).tolist(), **score_summary(scores),
              "tiles_fraction": [round(r["tiles_fraction"], 4) for r in results],
              "lap_finished": [bool(r["lap_finished"]) for r in results],
              "off_road_share": [round(r["off_road_share"], 4) for r in results],
              "wrong_way_share": [round(r["wrong_way_share"], 4) for r in results],
              "median_speed": [round(r["median_speed"], 2) for r in results],
              **{key: [round(r[key], 4) for r in results] for key in ("steer_change", "label_steer_change")},
              "control_period": CONTROL_PERIOD}
    if base["policy"] != "expert":
        ms = np.concatenate([r["plan_ms"] for r in results])
        report.update({"plan_ms_median": round(float(np.median(ms)), 2),
                       "plan_ms_p95": round(float(np.percentile(ms, 95)), 2), "prior": base["prior"]})
    if base["policy"] == "mpc":
        dtype = plan_dtype(base["mpc"]["precision"], pick_device(base["device"]))
        report.update({"planner": base["mpc"]["planner"], "mpc": base["mpc"],
                       "plan_dtype": str(dtype).removeprefix("torch."),
                       "compiled": all(r["compiled"] for r in results)})
    return report


def score_summary(scores: np.ndarray) -> dict:
    """Mean, std (population, as reported throughout), median, and the standard error of the mean: one
    track's score swings by hundreds of points with the rounding of near-tied plans (README, Results), and
    the difference of two such means has a standard error of about sqrt(2) times either's."""
    sem = float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else None
    return {"mean": float(scores.mean()), "std": float(scores.std()), "median": float(np.median(scores)), "sem": sem}


def _print(r: dict) -> None:
    extra = f"  plan {np.median(r['plan_ms']):.0f} ms" if "plan_ms" in r else ""
    print(f"seed {r['seed']:>4}: score {r['score']:7.1f}  tiles {r['tiles_fraction']:.3f}  "
          f"lap {'yes' if r['lap_finished'] else 'no '}  off-road {r['off_road_share']:.3f}  "
          f"wrong way {r['wrong_way_share']:.3f}  speed {r['median_speed']:5.1f}  "
          f"({r['seconds']:.1f}s){extra}", flush=True)


def latest_round(models_dir) -> Path:
    """The folder of the newest predictor and judge: MODELS_DIR/onpolicy{r} of the last on-policy round that
    holds both (round 0's judge has never seen the MPC's drives and cannot drive alone), else MODELS_DIR."""
    rounds = onpolicy_rounds(models_dir, "predictor_final.pth", "cost_model_final.pth")
    return rounds[-1] if rounds else Path(models_dir)


def newest_prior(models_dir, latest: Path) -> Path:
    """The last round's prior where there is one (pipeline.py keeps there round 0's or the one retrained on the
    finished driver's labelled drives, whichever drove them better), else round 0's MODELS_DIR/prior_final.pth."""
    return latest / "prior_final.pth" if (latest / "prior_final.pth").exists() else Path(models_dir) / "prior_final.pth"


def newest_judge(latest: Path) -> Path:
    """The judge pipeline.py kept in the last round's folder where there is one (the round's or the one trained
    again with the DAgger drives, whichever drove the DAgger round's tracks better: README, "Which judge
    drives"); else the last round's. A retrained judge nobody checked is not used unasked: it cost two cars
    231.7 and 393.1 points a track."""
    kept = latest / JUDGE_KEPT
    return kept if kept.exists() else latest / "cost_model_final.pth"


def main(args):
    seeds = list(range(args.seed, args.seed + args.episodes))
    display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.name == "nt" \
        or os.uname().sysname == "Darwin"
    render = (args.render or display) and not args.headless and (args.workers or 1) == 1
    latest = latest_round(args.models_dir)
    base = {"policy": args.policy, "device": args.device, "max_steps": args.max_steps, "render": render,
            "record": args.record, "save_episodes": args.save_episodes, "threads": 0,
            "encoder": args.encoder or f"{args.models_dir}/encoder_final.pth",
            "predictor": args.predictor or str(latest / "predictor_final.pth"),
            "cost": args.cost or str(newest_judge(latest)),
            "prior": None if args.prior == "none" else (args.prior or str(newest_prior(args.models_dir, latest))),
            "mpc": {"planner": args.planner, "samples": args.samples, "horizon": args.horizon, "beta": args.beta,
                    "sigma": args.sigma, "iterations": args.iterations, "w_progress": args.w_progress,
                    "w_road": args.w_road, "w_expert": args.w_expert, "discount": args.discount,
                    "w_prior": args.w_prior, "prior_steps": args.prior_steps, "precision": args.precision,
                    "compile": args.compile}}
    if args.record:
        check_record_path(args.record)
    if args.policy == "prior" and not base["prior"]:
        raise SystemExit("--policy prior drives with the expert prior: give --prior PATH, not none")
    if args.policy != "expert":
        from models import CheckpointError
        try:
            load_mpc(uncompiled(base))              # fail now, with the stage to run, not in a worker
        except CheckpointError as e:
            raise SystemExit(f"cannot drive: {e}") from None
        print(f"models: encoder {base['encoder']}, predictor {base['predictor']}, judge {base['cost']}, "
              f"prior {base['prior']}", flush=True)
    if args.collect:
        from collection import run_collection
        if args.policy == "expert":
            raise SystemExit("--collect drives the MPC or the prior alone; the expert's data is collect_race_data.py")
        workers = args.workers or default_workers()
        run = argparse.Namespace(preset=args.preset, out_dir=args.collect, workers=workers, seed=args.seed,
                                 max_steps=args.max_steps, episodes=args.episodes, frames=None)
        return run_collection("onpolicy", OnPolicyDriver, run,
                              {"spec": base, "threads": max(1, (os.cpu_count() or 1) // workers)})
    report = evaluate(base, seeds, workers=args.workers or 1)
    tail = f"; planning {report['plan_ms_median']:.1f} ms median" if "plan_ms_median" in report else ""
    sem = f" (standard error of the mean {report['sem']:.1f})" if report["sem"] is not None else ""
    print(f"{args.policy}: mean {report['mean']:.1f} +- {report['std']:.1f}{sem} over track seeds "
          f"{seeds[0]}..{seeds[-1]}; laps finished {sum(report['lap_finished'])}/{len(seeds)}{tail}")
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report


def parser():
    p = common_parser(__doc__.splitlines()[0])
    g = p.add_argument_group("driving")
    g.add_argument("--policy", default="mpc", choices=["mpc", "expert", "prior"],
                   help="who drives: the MPC, the privileged expert, or the expert prior alone (ablation)")
    g.add_argument("--episodes", type=int, default=1, help="number of tracks: seeds S..S+N-1")
    g.add_argument("--json", default=None, help="write the scores report here")
    g.add_argument("--record", default=None, help="save the first episode as .mp4 or .gif")
    g.add_argument("--save-episodes", default=None, metavar="DIR",
                   help="also write every drive to DIR in the episode format, named by track seed: frames, "
                        "actions, the expert's label and the simulator state of each step (for analysis; these "
                        "are evaluation tracks, never train on them)")
    g.add_argument("--render", action="store_true", help="show the drive in a window")
    g.add_argument("--headless", action="store_true", help="never open a window")
    g.add_argument("--collect", default=None, metavar="DIR",
                   help="store the MPC's drives on --episodes training tracks (from --seed) in DIR, in the "
                        "episode format, instead of evaluating")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop each episode after this many control steps (quick checks; scores are then partial)")
    g = p.add_argument_group("models")
    g.add_argument("--models-dir", default=MODELS_DIR)
    g.add_argument("--encoder", default=None, help="default: MODELS_DIR/encoder_final.pth")
    g.add_argument("--predictor", default=None,
                   help="default: predictor_final.pth of the last on-policy round (MODELS_DIR/onpolicy{r}/), "
                        "else of MODELS_DIR")
    g.add_argument("--cost", default=None, help=f"default: {JUDGE_KEPT} (pipeline.py's choice) from the same "
                                                "folder, else cost_model_final.pth")
    g.add_argument("--prior", default=None,
                   help="expert prior checkpoint (default: prior_final.pth of the last on-policy round, where "
                        "pipeline.py's DAgger stage puts it, else of MODELS_DIR); none: plan without it")
    g = p.add_argument_group("planner")
    # iCEM by measurement: tuning tracks 500-511 with the on-policy models, 136.1 +- 146.1 vs 13.4 +- 61.3.
    g.add_argument("--planner", default="icem", choices=["shooting", "icem"],
                   help="icem: iterative CEM (the default, it drove better); shooting: the seed's best of N")
    g.add_argument("--samples", type=int, default=1000, help="action sequences per plan (total, all iterations)")
    g.add_argument("--horizon", type=int, default=15, help="control steps dreamt ahead")
    g.add_argument("--beta", type=float, default=2.0, help="coloured-noise exponent (0 white, 2 smooth)")
    g.add_argument("--sigma", type=float, default=0.5, help="noise scale around the warm-start plan")
    g.add_argument("--iterations", type=int, default=3, help="iCEM rounds")
    # The discriminator alone by measurement, once the judge has learned the MPC's own drives as not expert
    # (pipeline models after the on-policy round, tuning tracks 500-511): 691.0 +- 129.1 against 609.1 +- 149.5
    # with progress and road at weight 1. Before that round it could not drive alone (README, Results).
    g.add_argument("--w-progress", type=float, default=0.0, help="energy weight of predicted progress")
    g.add_argument("--w-road", type=float, default=0.0,
                   help="energy weight of predicted off-road (3 and more left the car standing on some tracks: "
                        "a dream that stands still never leaves the road; README, session 38)")
    g.add_argument("--w-expert", type=float, default=1.0, help="energy weight of the discriminator")
    g.add_argument("--discount", type=float, default=1.0, help="per-step discount of the energy")
    # 10 by measurement on three cars of today's prior (README, "Session 44"; tuning tracks 500-531, minus weight
    # 1 per track): the fifteenth run's +162.5 (SE 44.9), the sixteenth's +626.4 (SE 57.1; at 1 it stood still),
    # the fifteenth's rebuilt with a blanked gauge +85.1 (SE 31.5); held-out 0-99, the fifteenth's +69.0 (SE 19.9).
    # With the whole dream charged, 1 had beaten 3 on the first runs' prior (README, "The expert prior").
    g.add_argument("--w-prior", type=float, default=10.0,
                   help="energy weight of the squared distance between a plan's actions and the prior's")
    # 5 by measurement (README, "Session 39"): the run-13 car on tuning tracks 500-531, 864.2 +- 56.2 against
    # 807.6 +- 121.2 with the whole horizon (0); over 0-99 812.9 against 794.1, within the noise (SE 23.9).
    g.add_argument("--prior-steps", type=int, default=5,
                   help="the prior's term covers the dream's first N steps only (0: all; its guess in dreamt "
                        "states fades with the steps)")
    # auto by measurement (README, "Planning time"): on a CPU with native bfloat16 it plans 7-27% faster
    # and scored the same (session 10's models, tracks 0-29: bf16 minus fp32 +28.5, SE 29.8).
    g.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                   help="number format of the dream's layers; auto: bf16 on a CPU that computes it natively")
    g.add_argument("--compile", default="auto", choices=["on", "off", "auto"],
                   help="torch.compile the dream (half a minute to a minute, once per process); auto: on a CPU, "
                        "for models of the small size and up (a GPU plans in time without it)")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
