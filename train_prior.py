"""Step 5b: train the expert prior, the planner's first guess: (z_{t-1}, z_t) -> the expert's action.

    python train_prior.py                       # small preset, uses models/encoder_final.pth
    python train_prior.py --preset full --device cuda
    python train_prior.py --onpolicy-dirs data_dagger1 --out-dir models/dagger1   # + the MPC's labelled drives

Behaviour cloning on frozen latents of the expert's own steps: every race step, and the recovery drives'
steps outside their injected mistakes (the expert bringing the car back, so the prior has seen more than
the racing line). Random drives never teach it. With --onpolicy-dirs, the MPC's own drives teach it too,
each step labelled with what the expert would have done there (DAgger: the prior learns to get back from
where its own mistakes lead, which the expert's laps never show). drive_mpc.py dreams the prior's
closed-loop drive through the predictor as the planner's starting plan, and its energy adds how far a plan
strays from what the prior would do in each dreamt state (README, "The expert prior"). Writes
models/prior_final.pth and models/prior_stats.json (held-out R^2 of steer and longitudinal per epoch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import ExpertPrior, save_checkpoint
from presets import (MODELS_DIR, add_data_args, add_head_args, apply_preset, atomic_write, common_parser, data_dirs,
                     pick_device)
from probes import r2_score
from train_predictor import latent_caches

EXPERT_SOURCES = ("race", "recovery")


FORWARD_HEADING = 0.5    # rad: "forward" on-policy steps are on the road and within this of the track's way


def expert_steps(cache, onpolicy_steps: str = "all") -> dict:
    """Every step with the expert's action as its target: z_prev, z_now [N,D], target [N,2] (steer, longitudinal).

    Race and recovery: the expert's own steps outside the injected mistakes (the action it held). The MPC's
    drives (the onpolicy sources): the steps labelled with what the expert would have done there
    (expert_action, episode format 2), so the prior also learns the states its own driving leads to.
    onpolicy_steps "all" keeps every one; "forward" only those on the road facing along the track (facing
    the wrong way the expert steers to full lock to turn round, off the road towards a track the frame may
    not show, and a frame hardly tells either from driving on), which saved one car's DAgger prior and cost
    another's (README, "Session 42").
    """
    parts = []
    for s, name in enumerate(cache.data.names):
        own = name in EXPERT_SOURCES
        rows = cache.windows(s, horizon=1) if own or name.startswith("onpolicy") else []
        if not len(rows):
            continue
        w = cache.gather(s, rows, horizon=1, history=1)     # z [N,3,D] (t-1, t, t+1), action [N,1,3], mistake [N,2]
        if own:
            keep = ~w["mistake"][:, 0].astype(bool)         # the injected mistakes are not the expert's actions
            a = w["action"][keep, 0]
        else:
            label = w["expert_action"][:, 0]                # [N,3]; NaN in drives collected before the label
            keep = np.isfinite(label).all(1)
            if onpolicy_steps == "forward":
                keep &= w["on_road"][:, 0].astype(bool) & (np.abs(w["heading_err"][:, 0]) < FORWARD_HEADING)
            a = label[keep]
        if keep.any():
            parts.append({"z_prev": w["z"][keep, 0], "z_now": w["z"][keep, 1],
                          "target": np.stack([a[:, 0], a[:, 1] - a[:, 2]], 1)})
    if not parts:
        raise SystemExit("no expert steps (race, or recovery outside its mistakes): run collect_race_data.py first")
    return {k: torch.from_numpy(np.concatenate([p[k] for p in parts]).astype(np.float32)) for k in parts[0]}


@torch.no_grad()
def evaluate(model: ExpertPrior, t: dict) -> dict:
    model.eval()
    out = model(t["z_prev"], t["z_now"]).clamp(-1, 1).double()
    y = t["target"].double()
    model.train()
    return {"steer_r2": round(r2_score(out[:, 0], y[:, 0]), 4),
            "longitudinal_r2": round(r2_score(out[:, 1], y[:, 1]), 4)}


def main(args):
    apply_preset(args, "prior")
    device = torch.device(pick_device(args.device))
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_cache, val_cache, enc = latent_caches(args.encoder, data_dirs(args), args.val_frac, args.seed, device)
    train = {k: v.to(device) for k, v in expert_steps(train_cache, args.onpolicy_steps).items()}
    val = {k: v.to(device) for k, v in expert_steps(val_cache, args.onpolicy_steps).items()}
    model = ExpertPrior(enc["config"]["latent"], args.hidden, args.members).to(device)
    x = torch.cat([train["z_prev"], train["z_now"]], 1)
    model.set_normalisation(x.mean(0), x.std(0))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = len(x)
    g = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in tqdm(range(1, args.epochs + 1), desc="expert prior", dynamic_ncols=True):
        for idx in torch.randperm(n, generator=g).split(args.batch_size):
            idx = idx.to(device)
            pred = model(train["z_prev"][idx], train["z_now"][idx], every=True)       # [members,B,2]
            loss = F.mse_loss(pred, train["target"][idx].expand_as(pred))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append({"epoch": epoch, **evaluate(model, val)})
    sources = [n for n in train_cache.data.names if n in EXPERT_SOURCES or n.startswith("onpolicy")]
    stats = {"val": history[-1], "train": evaluate(model, train), "per_epoch": history,
             "sources": sources, "train_steps": n, "val_steps": len(val["z_now"])}
    print(json.dumps(stats["val"]))
    atomic_write(out / "prior_stats.json", lambda f: f.write(json.dumps(stats, indent=1).encode()))
    save_checkpoint(out / "prior_final.pth", "prior", model, encoder_hash=train_cache.key, stats=json.dumps(stats))


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.set_defaults(out_dir=MODELS_DIR)
    p.add_argument("--encoder", default=f"{MODELS_DIR}/encoder_final.pth", help="frozen encoder checkpoint")
    add_data_args(p)
    # Nearly every expert episode: held-out laps are coverage the prior lacks (README, "The expert prior":
    # tuning tracks 500-511, 798.0 +- 82.8 with 2% held out against 775.1 +- 96.2 with the usual 10%).
    p.set_defaults(val_frac=0.02)
    p.add_argument("--onpolicy-steps", default="all", choices=["all", "forward"],
                   help="which labelled steps of --onpolicy-dirs teach the prior: every one, or only those on "
                        "the road facing along the track")
    g = add_head_args(p)
    g.add_argument("--members", type=int, default=None, help="networks averaged (different initialisations)")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
