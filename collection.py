"""The parallel episode runner behind the three collectors, and the summary of a data folder.

Each collector script only defines its policy; this module runs it over many tracks:
a pool of W spawned worker processes (each builds its own env, so the parent never touches pygame),
one `.npz` per episode written atomically, resume by skipping the files already on disk,
a tqdm bar over all workers, and a summary (scores, off-road share, speed, recoveries) at the end.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import queue
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carenv import make_env, run_episode
from data_loader import MISTAKES, SourceCache, episode_name, finished_episodes, write_episode
from presets import CONTROL_PERIOD, DATA_DIRS, EVAL_SEED_LIMIT, SOURCES, atomic_write, common_parser, \
    default_workers, preset

RECOVERY_WINDOW_S = 3.0          # a mistake counts as recovered if the car is on the road within this time


def collector_parser(source: str, description: str):
    p = common_parser(description)
    g = p.add_argument_group("collection")
    g.add_argument("--episodes", type=int, default=None,
                   help="episodes to collect (indices 0..N-1); default: enough for the preset's frame target")
    g.add_argument("--frames", type=int, default=None, help="frame (control step) target instead of --episodes")
    g.add_argument("--max-steps", type=int, default=None,
                   help="cap on control steps per episode (default: preset; none = the env's 1000-frame limit)")
    p.set_defaults(out_dir=DATA_DIRS[source])
    return p


def track_seed(source: str, seed: int, index: int) -> int:
    """Track seed of episode `index` of a run with base seed `seed`: reproducible, never an evaluation seed."""
    state = np.random.SeedSequence([seed, SOURCES.index(source), index]).generate_state(1)[0]
    return int(EVAL_SEED_LIMIT + state % (2 ** 31 - 1 - EVAL_SEED_LIMIT))


_ENV = None


def _work(task: dict) -> dict:
    """Runs in a worker process: one episode, written to disk. Never raises: errors come back as data."""
    global _ENV
    t0 = time.perf_counter()
    try:
        if _ENV is None:
            _ENV = make_env()
        policy = task["policy_cls"](**task["policy_kwargs"])
        rng = np.random.default_rng([task["seed"], SOURCES.index(task["source"]), task["index"]])
        ep = run_episode(_ENV, policy, task["track_seed"], k=task["k"], max_steps=task["max_steps"], rng=rng)
        rows = len(ep["obs"])
        meta = {"source": task["source"], "track_seed": task["track_seed"], "seed": task["seed"],
                "episode": task["index"], "k": task["k"], "policy": task["policy_cls"].__name__,
                "score": ep["score"], "lap_finished": ep["lap_finished"],
                "tiles_fraction": ep["tiles_fraction"], "n_tiles": ep["n_tiles"], "versions": _versions()}
        write_episode(Path(task["out_dir"]) / episode_name(task["seed"], task["index"], rows), ep, meta)
        return {"ok": True, "index": task["index"], "rows": rows, "env_frames": ep["env_frames"],
                "seconds": time.perf_counter() - t0}
    except Exception:
        _ENV = None                                           # a failed env may be in any state: rebuild it
        return {"ok": False, "index": task["index"], "track_seed": task["track_seed"],
                "error": traceback.format_exc(), "seconds": time.perf_counter() - t0}


def _versions() -> dict:
    """What the frames depend on: pygame draws them (2.5.8 and 2.6.1 differ in about 1% of the values of a
    64x64 frame, up to 33 levels at polygon edges; the physics and the expert's actions are the same)."""
    import gymnasium
    import pygame
    return {"gymnasium": gymnasium.__version__, "numpy": np.__version__, "pygame": pygame.version.ver}


def run_collection(source: str, policy_cls, args, policy_kwargs: dict | None = None) -> dict:
    """Collect episodes of `source` with `policy_cls` as the args say; return the folder's summary."""
    cfg = preset(args.preset)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or default_workers()
    max_steps = args.max_steps if args.max_steps is not None else cfg["max_steps"]
    done = finished_episodes(out, args.seed)
    if args.episodes is not None:
        todo = iter([i for i in range(args.episodes) if i not in done])
        target, have = None, 0
    else:
        target = args.frames if args.frames is not None else cfg["frames"][source]
        have = sum(done.values())
        todo = (i for i in range(10 ** 9) if i not in done)
    skipped = len(done) if args.episodes is None else sum(i in done for i in range(args.episodes))
    if skipped:
        print(f"{out}: {skipped} episodes already on disk, skipping them")

    def task(i):
        return {"source": source, "seed": args.seed, "index": i, "track_seed": track_seed(source, args.seed, i),
                "k": CONTROL_PERIOD, "max_steps": max_steps, "policy_cls": policy_cls,
                "policy_kwargs": policy_kwargs or {}, "out_dir": str(out)}

    results: queue.Queue = queue.Queue()
    failures, busy_s, env_frames, n_new = [], 0.0, 0, 0
    total = args.episodes if target is None else target
    bar = tqdm(total=total, initial=skipped if target is None else min(have, target),
               unit="ep" if target is None else "frame", desc=source, dynamic_ncols=True)
    t_start = time.perf_counter()
    # spawn, not fork: workers start clean (no pygame/SDL or CUDA state copied from the parent).
    with mp.get_context("spawn").Pool(workers) as pool:
        in_flight = 0
        while True:
            while in_flight < workers and (target is None or have < target):
                i = next(todo, None)
                if i is None:
                    break
                pool.apply_async(_work, (task(i),), callback=results.put)
                in_flight += 1
            if in_flight == 0:
                break
            r = results.get()
            in_flight -= 1
            busy_s += r["seconds"]
            if not r["ok"]:
                failures.append(r)
                tqdm.write(f"episode {r['index']} (track seed {r['track_seed']}) failed:\n{r['error']}")
                continue
            n_new += 1
            have += r["rows"]
            env_frames += r["env_frames"]
            bar.update(1 if target is None else min(r["rows"], max(0, target - bar.n)))
            bar.set_postfix(episodes=len(done) + n_new,
                            env_fps=f"{env_frames / (time.perf_counter() - t_start):.0f}")
    bar.close()
    summary = summarise(out)
    summary["run"] = {"new_episodes": n_new, "failed_track_seeds": [f["track_seed"] for f in failures],
                      "workers": workers, "wall_s": round(time.perf_counter() - t_start, 1),
                      "env_frames_per_s_per_worker": round(env_frames / busy_s, 1) if busy_s else None}
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    print(json.dumps(summary, indent=1))
    return summary


def summarise(folder) -> dict:
    """Figures of a data folder, from the files on disk (so a resumed run reports on all of them)."""
    cache = SourceCache(folder)
    cols, metas = cache.columns, [e["meta"] for e in cache.episodes]
    k = cache.k
    on_road, mistake = np.asarray(cols["on_road"]), np.asarray(cols["mistake"])
    scores = np.array([m["score"] for m in metas])
    disk = sum((Path(folder) / e["file"]).stat().st_size for e in cache.episodes)
    out = {"episodes": len(metas), "frames": int(cache.rows), "control_period": k,
           "bytes_per_frame_on_disk": round(disk / cache.rows, 1),
           "score_mean": round(float(scores.mean()), 1), "score_std": round(float(scores.std()), 1),
           "laps_finished": int(sum(m["lap_finished"] for m in metas)),
           "tiles_fraction_mean": round(float(np.mean([m["tiles_fraction"] for m in metas])), 3),
           "off_road_share": round(float(1 - on_road.mean()), 3),
           "median_speed": round(float(np.median(cols["speed"])), 1),
           "bad_files": cache.bad}
    if mistake.any():
        window = int(np.ceil(RECOVERY_WINDOW_S * 50 / k))
        n, recovered, by_kind = 0, 0, {}
        for start, length in zip(cache.starts, cache.lengths):
            m, road = mistake[start:start + length], on_road[start:start + length]
            ends = np.flatnonzero((m[:-1] != 0) & (m[1:] != m[:-1])) + 1   # first row after a mistake
            for e in ends:
                if e + window > length and not road[e:].any():
                    continue                                  # episode ended before we could tell
                ok = bool(road[e:e + window + 1].any())
                kind = MISTAKES[int(m[e - 1])]
                n, recovered = n + 1, recovered + ok
                k_n, k_ok = by_kind.get(kind, (0, 0))
                by_kind[kind] = (k_n + 1, k_ok + ok)
        out["mistakes"] = n
        out["recovered_within_3s"] = round(recovered / n, 3) if n else None
        out["recovered_by_kind"] = {kd: round(ok / c, 3) for kd, (c, ok) in sorted(by_kind.items())}
        out["mistake_share"] = round(float((mistake != 0).mean()), 3)
    cache.close()
    return out
