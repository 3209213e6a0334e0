"""Drive and evaluate: the project's one entry point for scores.

    python drive_mpc.py --policy expert --episodes 20 --seed 0 --json expert.json

drives track seeds S..S+N-1 (seeds below 1,000,000 are never used for data, so they are unseen
tracks), prints each score and the mean +- std, and writes the JSON report:
{"scores", "mean", "std", "tiles_fraction", "lap_finished", "seeds", ...}.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np

from carenv import Expert, make_env, run_episode
from presets import CONTROL_PERIOD, atomic_write, common_parser

POLICIES = {"expert": Expert}


def _drive(job: tuple) -> dict:
    """One evaluation episode (runs in a worker process, or inline with --workers 1)."""
    policy_name, track_seed, max_steps = job
    env = make_env()
    t0 = time.perf_counter()
    ep = run_episode(env, POLICIES[policy_name](), track_seed, k=CONTROL_PERIOD, max_steps=max_steps)
    env.close()
    return {"seed": track_seed, "score": ep["score"], "tiles_fraction": ep["tiles_fraction"],
            "lap_finished": ep["lap_finished"], "steps": len(ep["obs"]),
            "off_road_share": float(1 - ep["on_road"].mean()), "seconds": time.perf_counter() - t0}


def evaluate(policy: str, seeds: list[int], workers: int = 1, max_steps: int | None = None) -> dict:
    jobs = [(policy, s, max_steps) for s in seeds]
    if workers > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = []
            for r in pool.imap(_drive, jobs):
                results.append(r)
                _print(r)
    else:
        results = []
        for job in jobs:
            results.append(_drive(job))
            _print(results[-1])
    scores = np.array([r["score"] for r in results])
    return {"policy": policy, "seeds": seeds, "scores": scores.round(2).tolist(),
            "mean": float(scores.mean()), "std": float(scores.std()),
            "tiles_fraction": [round(r["tiles_fraction"], 4) for r in results],
            "lap_finished": [bool(r["lap_finished"]) for r in results],
            "off_road_share": [round(r["off_road_share"], 4) for r in results],
            "control_period": CONTROL_PERIOD}


def _print(r: dict) -> None:
    print(f"seed {r['seed']:>4}: score {r['score']:7.1f}  tiles {r['tiles_fraction']:.3f}  "
          f"lap {'yes' if r['lap_finished'] else 'no '}  off-road {r['off_road_share']:.3f}  "
          f"({r['seconds']:.1f}s)", flush=True)


def main(args):
    seeds = list(range(args.seed, args.seed + args.episodes))
    report = evaluate(args.policy, seeds, workers=args.workers or 1, max_steps=args.max_steps)
    print(f"{args.policy}: mean {report['mean']:.1f} +- {report['std']:.1f} over track seeds "
          f"{seeds[0]}..{seeds[-1]}; laps finished {sum(report['lap_finished'])}/{len(seeds)}")
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report


def parser():
    p = common_parser(__doc__.splitlines()[0])
    g = p.add_argument_group("driving")
    g.add_argument("--policy", default="expert", choices=sorted(POLICIES), help="who drives")
    g.add_argument("--episodes", type=int, default=10, help="number of tracks: seeds S..S+N-1")
    g.add_argument("--json", default=None, help="write the scores report here")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop each episode after this many control steps (quick checks; scores are then partial)")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
