"""Measure the pipeline's speeds side by side on this machine and print one table.

    python benchmark.py                       # about 4 minutes on 2 CPU cores
    python benchmark.py --json bench.json --device cuda

Each row runs in its own subprocess, so its peak RSS is its own. Rows:
  env        bare CarRacing-v3 steps/s (random actions), one process
  collector  collector frames/s per worker (expert: env + 64x64 frame + privileged state + policy)
  scaling    whole-run env frames/s of the collection runner with 1 worker and with all workers
  loader     frames/s and H=15 windows/s from the frame cache (balanced batches)
  encoder    VICReg training images/s of the encoder at the chosen preset (random frames)
  predictor  T+15 predictor training windows/s at the chosen preset
  planning   MPC milliseconds per decision (1,000 x 15) at the small and full sizes, both planners, and
             iCEM with the expert prior (drive_mpc.py's default: its dream first, then the plan) in
             float32, at --precision auto (bfloat16 layers where the device computes them natively), and
             at --precision auto --compile on (torch.compile; its half minute of compiling is not counted)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
ROOT = Path(__file__).resolve().parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_env(frames: int) -> dict:
    import numpy as np
    from carenv import make_env
    env = make_env()
    env.reset(seed=500)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(frames):
        _, _, term, trunc, _ = env.step(rng.uniform([-1, 0, 0], [1, 1, 0.2]).astype(np.float32))
        if term or trunc:
            env.reset(seed=500)
    return {"env_steps_per_s": frames / (time.perf_counter() - t0)}


def bench_collector(steps: int) -> dict:
    from carenv import Expert, make_env, run_episode
    env = make_env()
    t0 = time.perf_counter()
    ep = run_episode(env, Expert(), 500, max_steps=steps)
    return {"collector_env_frames_per_s": ep["env_frames"] / (time.perf_counter() - t0)}


def bench_scaling(workers: int, episodes: int, steps: int) -> dict:
    from argparse import Namespace
    from collect_race_data import Expert
    from collection import run_collection
    with tempfile.TemporaryDirectory() as d:
        args = Namespace(preset="tiny", out_dir=d, workers=workers, seed=0, episodes=episodes, frames=None,
                         max_steps=steps)
        t0 = time.perf_counter()
        s = run_collection("race", Expert, args)
        wall = time.perf_counter() - t0
    frames = s["frames"] * s["control_period"]
    return {"workers": workers, "env_frames_per_s_total": frames / wall,
            "env_frames_per_s_per_worker_busy": s["run"]["env_frames_per_s_per_worker"]}


def _synthetic_data(folder: str, episodes: int, rows: int) -> None:
    import numpy as np
    from data_loader import COLUMNS, write_episode
    rng = np.random.default_rng(0)
    for i in range(episodes):
        ep = {"obs": rng.integers(0, 255, (rows, 64, 64, 3), dtype=np.uint8)}
        ep.update({n: np.zeros((rows, *s), d) for n, (d, s) in COLUMNS.items()})
        write_episode(Path(folder) / f"s0_ep{i:06d}_T{rows}.npz", ep, {"k": 4})


def bench_loader(seconds: float) -> dict:
    from data_loader import BalancedBatches, EpisodeData
    with tempfile.TemporaryDirectory() as d:
        dirs = {}
        for name in ("race", "recovery", "random"):
            dirs[name] = f"{d}/{name}"
            _synthetic_data(dirs[name], 6, 500)
        data = EpisodeData(dirs, "all")
        out = {}
        for kind, batch, per in (("frames", 256, 1), ("windows", 64, 1)):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for b in BalancedBatches(data, batch, kind=kind, horizon=15, seed=n).epoch(0):
                    n += len(b["obs"])
                    if time.perf_counter() - t0 > seconds:
                        break
            out[f"loader_{kind}_per_s"] = n / (time.perf_counter() - t0)
    return out


def bench_encoder(preset_name: str, device: str, steps: int) -> dict:
    import torch
    from models import Expander, TinyEncoder
    from presets import pick_device, preset
    from train_encoder import amp_dtype, augment, vicreg_terms
    cfg = preset(preset_name)["encoder"]
    dev = torch.device(pick_device(device))
    enc = TinyEncoder(cfg["width"], cfg["latent"]).to(dev)
    exp = Expander(cfg["latent"], cfg["expander"]).to(dev)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(exp.parameters()), 1e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = amp_dtype(dev)
    b = cfg["batch_size"]
    x = torch.randint(0, 255, (b, 64, 64, 3), dtype=torch.uint8, device=dev)

    def step():
        f = x.permute(0, 3, 1, 2).float() / 255
        v1, _ = augment(f, gen, 2.0, 0.9, 0.1)
        v2, _ = augment(f, gen, 2.0, 0.9, 0.1)
        with torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext():
            z1, z2 = exp(enc(torch.cat([v1, v2]))).float().chunk(2)
        t = vicreg_terms(z1, z2)
        loss = 25 * t["inv"] + 25 * t["var"] + t["cov"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"preset": preset_name, "device": str(dev), "amp": str(dtype),
            "encoder_images_per_s": steps * b / (time.perf_counter() - t0)}


def bench_predictor(preset_name: str, device: str, steps: int) -> dict:
    """Predictor training windows/s: H=15 rollouts on latents (what train_predictor.py does after caching)."""
    import torch
    from models import Predictor
    from presets import pick_device, preset
    cfg, enc = preset(preset_name)["predictor"], preset(preset_name)["encoder"]
    dev = torch.device(pick_device(device))
    model = Predictor(enc["latent"], cfg["hidden"], cfg["layers"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    b = cfg["batch_size"]
    z, a = torch.randn(b, 17, enc["latent"], device=dev), torch.rand(b, 15, 3, device=dev)
    t0 = time.perf_counter()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = ((model.rollout(z[:, :2], a) - z[:, 2:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"preset": preset_name, "predictor_windows_per_s": steps * b / (time.perf_counter() - t0)}


def preset_policy(preset_name: str, device: str = "cpu", planner: str = "icem", prior: bool = False,
                  precision: str = "fp32", compile: str = "off"):
    """An MPCPolicy of the preset's sizes with untrained weights, reset: the cost of planning, not its quality."""
    import numpy as np
    import torch
    from planner import MPCPolicy
    from models import CostModel, ExpertPrior, Predictor, TinyEncoder
    from presets import pick_device, preset
    p = preset(preset_name)
    dev = torch.device(pick_device(device))
    lat = p["encoder"]["latent"]
    policy = MPCPolicy(TinyEncoder(p["encoder"]["width"], lat).to(dev),
                       Predictor(lat, p["predictor"]["hidden"], p["predictor"]["layers"]).to(dev),
                       CostModel(lat, p["cost"]["hidden"]).to(dev), dev, planner=planner,
                       prior=ExpertPrior(lat, p["prior"]["hidden"]).to(dev) if prior else None, precision=precision,
                       compile=compile)
    policy.reset(np.random.default_rng(0))
    return policy


def bench_planning(preset_name: str, device: str, planner: str, plans: int, prior: bool = False,
                   precision: str = "fp32", compile: str = "off") -> dict:
    """Milliseconds per MPC decision: encode one frame, (dream the prior's plan,) 1,000 sequences x 15 steps,
    judge, pick."""
    import numpy as np
    policy = preset_policy(preset_name, device, planner, prior, precision, compile)
    frame = np.zeros((64, 64, 3), np.uint8)
    ms = [float(policy.act(frame)[1]["plan_ms"]) for _ in range(plans + 2)][2:]      # 2 warm-up plans
    return {"preset": preset_name, "planner": planner, "prior": prior, "precision": precision,
            "compiled": policy.compiled, "plan_ms_median": float(np.median(ms)),
            "plan_ms_p95": float(np.percentile(ms, 95))}


SECTIONS = {"env": bench_env, "collector": bench_collector, "scaling": bench_scaling, "loader": bench_loader,
            "encoder": bench_encoder, "predictor": bench_predictor, "planning": bench_planning}


def run_section(name: str, **kwargs) -> dict:
    """Run one section in a fresh interpreter and return its figures plus its peak RSS."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import benchmark as b; "
            f"r = b.SECTIONS[{name!r}](**{kwargs!r}); r['peak_rss_mb'] = b._peak_mb(); print('RESULT', json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"benchmark section {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[-1][7:])


def main(args):
    from presets import default_workers
    workers = args.workers or default_workers()
    rows = []
    plan = [("env", {"frames": 1500}), ("collector", {"steps": 300}),
            ("scaling", {"workers": 1, "episodes": 2, "steps": 150}),
            ("scaling", {"workers": workers, "episodes": 2 * workers, "steps": 150}),
            ("loader", {"seconds": 5.0}), ("encoder", {"preset_name": args.preset, "device": args.device, "steps": 10}),
            ("predictor", {"preset_name": args.preset, "device": args.device, "steps": 20})]
    plan += [("planning", {"preset_name": size, "device": args.device, "planner": planner, "plans": 10, "prior": prior,
                           "precision": precision, "compile": compile})
             for size in ("small", "full") for planner, prior, precision, compile in
             (("shooting", False, "fp32", "off"), ("icem", False, "fp32", "off"), ("icem", True, "fp32", "off"),
              ("icem", True, "auto", "off"), ("icem", True, "auto", "on"))]
    for name, kw in plan:
        r = run_section(name, **kw)
        rows.append({"section": name, **r})
        print(f"{name:<10} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items()), flush=True)
    by = {r["section"]: r for r in rows}                     # the last row of each section
    ratio = by["loader"]["loader_frames_per_s"] / by["encoder"]["encoder_images_per_s"]
    print(f"\nloader frames/s / encoder images/s = {ratio:.1f}x  (must be >= 3x)")
    print(f"collector frames/s per worker / bare env steps/s = "
          f"{by['collector']['collector_env_frames_per_s'] / by['env']['env_steps_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "loader_over_encoder": ratio}, indent=1))


def parser():
    from presets import common_parser
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
