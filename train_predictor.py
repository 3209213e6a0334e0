"""Step 4: train the latent dynamics model on 15-step rollouts of its own predictions (T+15).

    python train_predictor.py                            # small preset, uses models/encoder_final.pth
    python train_predictor.py --preset full --device cuda
    python train_predictor.py --resume
    python train_predictor.py --onpolicy-dirs data_onpolicy1 --init models/predictor_final.pth --epochs 8 \
        --lr 2e-4 --out-dir models/onpolicy1    # one round of learning from the MPC's own drives

First encodes every episode once with the frozen encoder into a latent cache (keyed by the encoder
checkpoint's content hash, memory-mapped beside the frame cache), then trains from latents only, so
it runs at thousands of windows per second even on a CPU. Writes models/predictor_ep{N}.pth,
models/predictor_final.pth, models/predictor_stats.jsonl, models/predictor_horizon.png and
models/predictor_probes.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_loader import EpisodeData, LatentCache, batch_counts
from models import Predictor, build, load_checkpoint, load_weights, save_checkpoint
from presets import MODELS_DIR, add_data_args, apply_preset, atomic_write, common_parser, data_dirs, pick_device
from probes import LinearProbe

EVAL_STEPS = (1, 5, 10, 15)


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def latent_caches(encoder_path, dirs: dict, val_frac: float, seed: int, device) -> tuple:
    """(train LatentCache, val LatentCache, encoder checkpoint); encodes whatever is not cached yet."""
    ckpt = load_checkpoint(encoder_path, "encoder", map_location=device, stage="train_encoder.py")
    encoder = build(ckpt, device).eval()
    key, dim = file_hash(encoder_path), ckpt["config"]["latent"]

    @torch.no_grad()
    def encode(frames: np.ndarray) -> np.ndarray:
        return encoder(torch.from_numpy(frames).to(device)).float().cpu().numpy()

    out = []
    for split in ("train", "val"):
        data = EpisodeData(dirs, split, val_frac, seed)
        bar = tqdm(desc=f"encoding ({split} caches)", unit="frame", dynamic_ncols=True, leave=False)
        out.append(LatentCache(data, key, dim, encode, progress=bar.update))
        bar.close()
    return out[0], out[1], ckpt


def same_encoder(ckpt: dict, path, key: str, hint: str) -> None:
    """Exit unless predictor checkpoint `ckpt` (from `path`) was trained on the encoder whose hash is `key`."""
    if ckpt.get("encoder_hash") != key:
        raise SystemExit(f"{path} was trained on another encoder checkpoint{hint}")


def sample_windows(cache: LatentCache, pools: list, batch: int, horizon: int, history: int, rng) -> dict:
    """A balanced batch of windows: each source its equal share (+-1), rows drawn with replacement."""
    counts = batch_counts(batch, np.full(len(pools), 1 / len(pools)), rng)
    parts = [cache.gather(s, rng.choice(pools[s], n), horizon, history) for s, n in enumerate(counts) if n]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def rollout_loss(model: Predictor, z: torch.Tensor, actions: torch.Tensor, history: int) -> torch.Tensor:
    """Mean over every step of the horizon of the squared error, in standardised latent units."""
    pred = model.rollout(z[:, :history + 1], actions)
    return (((pred - z[:, history + 1:]) / model.sd) ** 2).mean()


@torch.no_grad()
def evaluate(model: Predictor, cache: LatentCache, horizon: int, history: int, device, n: int = 2048) -> dict:
    """Held-out latent error at steps 1/5/10/15 divided by the copy-the-current-state baseline's, per source."""
    rng = np.random.default_rng(0)
    model.eval()
    out = {}
    for s, name in enumerate(cache.data.names):
        rows = cache.sample_windows(s, horizon, n, rng)
        if not len(rows):
            continue
        w = cache.gather(s, rows, horizon, history)
        z = torch.from_numpy(w["z"]).to(device)
        pred = model.rollout(z[:, :history + 1], torch.from_numpy(w["action"]).to(device))
        truth, now = z[:, history + 1:], z[:, history:history + 1]
        err = ((pred - truth) ** 2).mean((0, 2))                   # [H]
        copy = ((now - truth) ** 2).mean((0, 2))                   # [H]
        out[name] = {f"ratio@{h}": round(float(err[h - 1] / copy[h - 1]), 4) for h in EVAL_STEPS if h <= horizon}
        out[name]["ratio_curve"] = [round(float(x), 4) for x in (err / copy)]
    model.train()
    return out


def plot_horizon(row: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in row["val"].items():
        ax.plot(range(1, len(r["ratio_curve"]) + 1), r["ratio_curve"], marker="o", label=name)
    ax.axhline(1.0, color="gray", ls="--", label="copy current state")
    ax.axhline(0.5, color="gray", ls=":", label="target at T+15")
    ax.set_xlabel("steps ahead (control periods)"), ax.set_ylabel("error / copy-baseline error")
    ax.set_title(f"held-out prediction error, epoch {row['epoch']}"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def leaving_recall(probe: LinearProbe, pred: torch.Tensor, true: torch.Tensor, on_road: torch.Tensor, h: int) -> dict:
    """pred, true [N,D]: predicted and true latents h steps ahead; on_road [N,H+1] (step 0 = now).
    -> of the windows that leave the road (on at 0, off at h), the share the probe calls off, read from the
    predicted and from the true latent, and their count; {} when no window leaves."""
    left = on_road[:, 0].bool() & ~on_road[:, h].bool()
    if not left.any():
        return {}
    return {f"leaving_road_recall@{h}_predicted": round(float((~probe.predict(pred[left])).double().mean()), 4),
            f"leaving_road_recall@{h}_true_latent": round(float((~probe.predict(true[left])).double().mean()), 4),
            f"leaving_road_windows@{h}": int(left.sum())}


@torch.no_grad()
def probe_through_prediction(model: Predictor, train: LatentCache, val: LatentCache, horizon: int, history: int,
                             device, n: int = 4000) -> dict:
    """Do predicted latents still carry the scene? Probes fit on true train latents, scored on predictions.

    Also the motion check: speed and yaw rate read from the predictor's input state (z_{t-1}, z_t)
    against from z_t alone; and whether a dream sees the car leave the road: of the windows on the road
    at t and off it at t+h, the share the on-road probe calls off the road (recall; on-road accuracy alone
    is dominated by the many windows that stay on the road).
    """
    rng = np.random.default_rng(1)

    def windows(cache):
        parts = []
        for s in range(len(cache.data.names)):
            parts.append(cache.gather(s, cache.sample_windows(s, horizon, n // 3, rng), horizon, history))
            parts[-1]["source"] = np.full(len(parts[-1]["z"]), s)
        return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    tr, va = windows(train), windows(val)
    pred = model.rollout(va["z"][:, :history + 1].to(device), va["action"].to(device)).cpu()
    out, by_source = {}, {}
    for key, kind in (("speed", "ridge"), ("on_road", "logistic")):
        probe = LinearProbe(kind).fit(tr["z"][:, history], tr[key][:, 0])
        for h in (5, 15):
            if h <= horizon:
                out[f"{key}@{h}_predicted"] = round(probe.score(pred[:, h - 1], va[key][:, h]), 4)
                out[f"{key}@{h}_true_latent"] = round(probe.score(va["z"][:, history + h], va[key][:, h]), 4)
                if key == "on_road":
                    out |= leaving_recall(probe, pred[:, h - 1], va["z"][:, history + h], va[key], h)
                    # Per source too: the planner's own drives leave the road in ways the others do not.
                    for s, name in enumerate(val.data.names):
                        m = va["source"] == s
                        by_source.setdefault(name, {}).update(
                            leaving_recall(probe, pred[m, h - 1], va["z"][m, history + h], va[key][m], h))
    for key in ("speed", "yaw_rate"):
        state_tr, state_va = tr["z"][:, :history + 1].flatten(1), va["z"][:, :history + 1].flatten(1)
        out[f"{key}_r2_from_input_state"] = round(LinearProbe().fit(state_tr, tr[key][:, 0]).score(state_va, va[key][:, 0]), 4)
        out[f"{key}_r2_from_current_latent"] = round(
            LinearProbe().fit(tr["z"][:, history], tr[key][:, 0]).score(va["z"][:, history], va[key][:, 0]), 4)
    return out | {"leaving_road_by_source": {k: v for k, v in by_source.items() if v}}


def main(args):
    apply_preset(args, "predictor")
    device = torch.device(pick_device(args.device))
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = data_dirs(args)
    t0 = time.perf_counter()
    train, val, enc_ckpt = latent_caches(args.encoder, dirs, args.val_frac, args.seed, device)
    encode_s = time.perf_counter() - t0
    h, hist = args.horizon, args.history
    pools = [train.windows(s, h) for s in range(len(train.data.names))]
    for name, pool in zip(train.data.names, pools):
        if not len(pool):
            raise SystemExit(f"source {name!r} has no episode longer than {h} control steps")

    model = Predictor(enc_ckpt["config"]["latent"], args.hidden, args.layers, hist).to(device)
    if args.init:
        # Warm start (weights and normalisation) from an earlier predictor of the same encoder: a round
        # on new on-policy data then needs a few epochs, not a whole training.
        init = load_checkpoint(args.init, "predictor", map_location=device, stage="train_predictor.py")
        same_encoder(init, args.init, train.key, f"than {args.encoder}")
        load_weights(model, init)
    else:
        allz = torch.from_numpy(np.concatenate([np.asarray(z[r]) for z, r in
                                                ((train.latents[s], train.data.rows(s)) for s in range(len(pools)))]))
        model.set_normalisation(allz.mean(0).to(device), allz.std(0).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.batches_per_epoch or max(1, sum(len(p) for p in pools) // args.batch_size)
    total = args.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    start, stats = 0, []
    if args.resume and (found := sorted(out.glob("predictor_ep*.pth"), key=lambda p: int(p.stem.split("ep")[-1]))):
        ckpt = load_checkpoint(found[-1], "predictor", map_location=device)
        same_encoder(ckpt, found[-1], train.key, "; start afresh without --resume")
        load_weights(model, ckpt)
        opt.load_state_dict(ckpt["optimizer"]), sched.load_state_dict(ckpt["scheduler"])
        start, stats = ckpt["epoch"], ckpt["stats"]
        print(f"resuming from {found[-1]} (epoch {start})")

    for epoch in range(start, args.epochs):
        # -- train: balanced windows from the latent cache, H-step rollouts on the model's own outputs
        rng = np.random.default_rng([args.seed, epoch])
        t_ep, losses = time.perf_counter(), []
        for _ in tqdm(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True):
            w = sample_windows(train, pools, args.batch_size, h, hist, rng)
            loss = rollout_loss(model, torch.from_numpy(w["z"]).to(device), torch.from_numpy(w["action"]).to(device), hist)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t_ep
        # -- measure on held-out episodes, then checkpoint
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5), "val": evaluate(model, val, h, hist, device),
               "windows_per_s": round(steps * args.batch_size / seconds, 1), "seconds": round(seconds, 2)}
        stats.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "val"} |
                         {n: r.get(f"ratio@{h}") for n, r in row["val"].items()}), flush=True)
        save_checkpoint(out / f"predictor_ep{epoch + 1}.pth", "predictor", model, optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), epoch=epoch + 1, stats=stats, encoder_hash=train.key)
        atomic_write(out / "predictor_stats.jsonl", lambda f: f.write("".join(json.dumps(s) + "\n" for s in stats).encode()))
        plot_horizon(row, out / "predictor_horizon.png")

    probes = probe_through_prediction(model, train, val, h, hist, device)
    probes["encode_seconds"] = round(encode_s, 1)
    print("probes:", json.dumps(probes))
    atomic_write(out / "predictor_probes.json", lambda f: f.write(json.dumps(probes, indent=1).encode()))
    save_checkpoint(out / "predictor_final.pth", "predictor", model, epoch=args.epochs, stats=stats,
                    encoder_hash=train.key, horizon=h, probes=probes, final=True)


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.set_defaults(out_dir=MODELS_DIR)
    p.add_argument("--encoder", default=f"{MODELS_DIR}/encoder_final.pth", help="frozen encoder checkpoint")
    add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=None)
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--history", type=int, default=1, help="past latents fed beside the current one (motion)")
    g.add_argument("--horizon", type=int, default=15, help="training and evaluation rollout length H")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--init", default=None, help="start from this predictor checkpoint's weights (same encoder)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--batches-per-epoch", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
