"""Step 2: train the TinyEncoder with VICReg on the balanced mix of race / recovery / random frames.

    python train_encoder.py                              # small preset, CPU or GPU
    python train_encoder.py --preset full --device cuda  # the seed's ResNet18, batch 256, AMP
    torchrun --nproc_per_node 2 train_encoder.py --preset full      # several GPUs (DDP)
    python train_encoder.py --resume                     # continue from the newest checkpoint

Writes models/encoder_mixed_ep{N}.pth every epoch, models/encoder_final.pth at the end,
models/encoder_stats.jsonl (one line per epoch), models/encoder_loss.png, and
models/encoder_probes.json (linear probes on held-out episodes: is the latent useful, or collapsed?).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_loader import BalancedBatches, EpisodeData, prefetch
from models import Expander, TinyEncoder, load_checkpoint, load_weights, save_checkpoint
from presets import (HUD_MODES, MODELS_DIR, add_data_args, apply_preset, atomic_write, common_parser, data_dirs,
                     pick_device)
from probes import probe_report

CKPT_RE = re.compile(r"encoder_mixed_ep(\d+)\.pth$")


# ---------------------------------------------------------------- loss and views
def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> dict:
    """VICReg (Bardes et al. 2022) on embeddings [B,E]; computed in float32 even under autocast.

    invariance: MSE between the views; variance: hinge on each dimension's std (target 1);
    covariance: squared off-diagonal covariance, summed and divided by E.
    """
    z1, z2 = z1.float(), z2.float()
    inv = F.mse_loss(z1, z2)
    var, cov = 0.0, 0.0
    for z in (z1, z2):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        var = var + F.relu(1 - std).mean() / 2
        c = (z.T @ z) / (len(z) - 1)
        off = c - torch.diag(torch.diag(c))
        cov = cov + off.pow(2).sum() / z.shape[1] / 2
    return {"inv": inv, "var": var, "cov": cov}


def augment(x: torch.Tensor, gen: torch.Generator, shift: float, scale_min: float, jitter: float):
    """Two-view augmentation with parameters drawn per sample. x: float [B,3,64,64] in 0..1.

    Small shifts and zooms (no flip: it would swap left and right turns) and mild brightness /
    contrast / saturation jitter that keeps grass green and road grey. Returns (views, params [B,6]).
    """
    b, dev = len(x), x.device

    def u(lo, hi):
        return torch.rand(b, generator=gen, device=dev) * (hi - lo) + lo
    s, tx, ty = u(scale_min, 1.0), u(-shift, shift) * 2 / 64, u(-shift, shift) * 2 / 64
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright, contrast, sat = u(-jitter, jitter), u(1 - jitter, 1 + jitter), u(1 - jitter, 1 + jitter)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.view(-1, 1, 1, 1) + mean + bright.view(-1, 1, 1, 1)
    gray = x.mean(1, keepdim=True)
    x = (gray + (x - gray) * sat.view(-1, 1, 1, 1)).clamp(0, 1)
    return x, torch.stack([s, tx, ty, bright, contrast, sat], 1)


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred embeddings (Roy & Vetterli 2007)."""
    s = torch.linalg.svdvals((z - z.mean(0)).float())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


# ---------------------------------------------------------------- device, precision, distribution
def amp_dtype(device: torch.device, choice: str = "auto"):
    """None (float32) on CPU/MPS; on GPUs bfloat16 where the hardware has it, else float16 + GradScaler.

    ROCm calls AMD GPUs "cuda" too; RDNA2 (gfx103x, e.g. the seed's RX 6950 XT) has no bfloat16 units.
    """
    if choice == "off" or device.type != "cuda":
        return None
    if choice in ("fp16", "bf16"):
        return torch.float16 if choice == "fp16" else torch.bfloat16
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "")
        has_bf16 = arch.startswith(("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12"))
    else:
        has_bf16 = props.major >= 8
    return torch.bfloat16 if has_bf16 else torch.float16


def setup_distributed(device_arg: str):
    """DDP when torchrun set WORLD_SIZE > 1 (gloo on CPU, nccl on GPUs); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return torch.device(pick_device(device_arg)), 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = pick_device(device_arg)
    if name.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(name)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def gather(z: torch.Tensor) -> torch.Tensor:
    """Concatenate embeddings of all ranks, keeping gradients, so variance/covariance see the global batch."""
    if not dist.is_initialized():
        return z
    import torch.distributed.nn.functional as dnn
    return torch.cat(dnn.all_gather(z), 0)


def latest_checkpoint(folder: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in folder.glob("encoder_mixed_ep*.pth") if (m := CKPT_RE.search(p.name))]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- helpers for evaluation
@torch.no_grad()
def encode_rows(encoder, data: EpisodeData, n: int, device, seed: int = 0, batch: int = 512):
    """Latents [n,D] and privileged state of up to n frames spread evenly over the sources of `data`."""
    rng = np.random.default_rng(seed)
    encoder.eval()
    zs, states = [], {k: [] for k in ("speed", "yaw_rate", "lateral", "heading_err", "on_road")}
    for s in range(len(data.names)):
        rows = data.rows(s)
        rows = np.sort(rng.choice(rows, size=min(len(rows), max(1, n // len(data.names))), replace=False))
        cache = data.caches[s]
        for i in range(0, len(rows), batch):
            r = rows[i:i + batch]
            zs.append(encoder(torch.from_numpy(cache.frames(r)).to(device)).float().cpu())
            for k in states:
                states[k].append(torch.from_numpy(np.asarray(cache.columns[k][r])))
    return torch.cat(zs), {k: torch.cat(v) for k, v in states.items()}


def plot_stats(stats: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [s["epoch"] for s in stats]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "inv", "var", "cov"):
        ax[0].plot(ep, [s[key] for s in stats], marker="o", label=key)
    ax[0].set_yscale("log"), ax[0].set_xlabel("epoch"), ax[0].legend(), ax[0].set_title("VICReg terms")
    ax[1].plot(ep, [s["effective_rank"] for s in stats], marker="o")
    ax[1].set_xlabel("epoch"), ax[1].set_title("effective rank of held-out latents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(args):
    apply_preset(args, "encoder")
    device, rank, world = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dirs = data_dirs(args)
    train = EpisodeData(dirs, "train", args.val_frac, args.seed, strict=args.strict)
    val = EpisodeData(dirs, "val", args.val_frac, args.seed, strict=args.strict)
    kind, horizon = ("windows", args.temporal) if args.temporal else ("frames", 15)
    batches = BalancedBatches(train, args.batch_size, kind=kind, horizon=horizon, seed=args.seed,
                              batches_per_epoch=args.batches_per_epoch, rank=rank, world_size=world)

    encoder = TinyEncoder(args.width, args.latent, args.hud, not args.no_coords, args.pool).to(device)
    expander = Expander(args.latent, args.expander).to(device)
    params = list(encoder.parameters()) + list(expander.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr * args.batch_size * world / 256, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(batches)
    warm = max(1, int(0.05 * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    start_epoch, stats = 0, []

    # -- resume: the newest epoch checkpoint restores weights, optimiser, schedule, scaler and RNG
    if args.resume and (last := latest_checkpoint(out)) is not None:
        ckpt = load_checkpoint(last, "encoder", map_location=device)
        load_weights(encoder, ckpt)
        load_weights(expander, ckpt["expander"])
        opt.load_state_dict(ckpt["optimizer"]), sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        gen.set_state(ckpt["rng"][rank].cpu())
        start_epoch, stats = ckpt["epoch"], ckpt["stats"]
        if rank == 0:
            print(f"resuming from {last} (epoch {start_epoch})")

    model = encoder
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        expander_ddp = torch.nn.parallel.DistributedDataParallel(expander, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        expander_ddp = expander
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    val_frames = torch.from_numpy(next(BalancedBatches(val, min(512, args.probe_frames), seed=args.seed,
                                                       batches_per_epoch=1).epoch(0))["obs"]).to(device)
    show = rank == 0
    from tqdm import tqdm

    for epoch in range(start_epoch, args.epochs):
        # -- train one epoch
        encoder.train(), expander.train()
        sums, n, wait, t0 = {"loss": 0.0, "inv": 0.0, "var": 0.0, "cov": 0.0}, 0, 0.0, time.perf_counter()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, dynamic_ncols=True)
        t_wait = time.perf_counter()
        for batch in prefetch(batches.epoch(epoch)):
            wait += time.perf_counter() - t_wait
            obs = torch.from_numpy(batch["obs"]).to(device, non_blocking=True)
            if kind == "windows":                # temporal pairs: frame t and frame t+d, d in 1..temporal
                d = torch.randint(1, args.temporal + 1, (len(obs),), generator=gen, device=device)
                x1, x2 = obs[:, 0], obs[torch.arange(len(obs), device=device), d]
            else:
                x1 = x2 = obs
            x1 = x1.permute(0, 3, 1, 2).float() / 255
            x2 = x2.permute(0, 3, 1, 2).float() / 255
            v1, _ = augment(x1, gen, args.shift, args.scale_min, args.jitter)
            v2, _ = augment(x2, gen, args.shift, args.scale_min, args.jitter)
            with autocast:
                z = expander_ddp(model(torch.cat([v1, v2])))
            z1, z2 = z.float().chunk(2)
            terms = vicreg_terms(gather(z1), gather(z2))
            loss = args.inv * terms["inv"] + args.var * terms["var"] + args.cov * terms["cov"]
            if not torch.isfinite(loss):
                raise SystemExit(f"loss became {loss.item()} at epoch {epoch + 1}; stopping. The last good "
                                 f"checkpoint is {latest_checkpoint(out)}; try a lower --lr or --amp off.")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            sums["loss"] += loss.item()
            for key in ("inv", "var", "cov"):
                sums[key] += terms[key].item()
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
            t_wait = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - t0

        # -- measure: held-out latent spread, then checkpoint
        encoder.eval()
        with torch.no_grad():
            zv = encoder(val_frames).float()
        row = {"epoch": epoch + 1, **{k: round(v / n, 5) for k, v in sums.items()},
               "latent_std_mean": round(float(zv.std(0).mean()), 4), "effective_rank": round(effective_rank(zv), 2),
               "images_per_s": round(n * args.batch_size * world / seconds, 1),
               "loader_wait_share": round(wait / seconds, 4), "lr": sched.get_last_lr()[0], "seconds": round(seconds, 1)}
        stats.append(row)
        rng_states = [gen.get_state().cpu()]
        if world > 1:
            rng_states = [torch.zeros_like(rng_states[0]) for _ in range(world)]
            dist.all_gather(rng_states, gen.get_state().cpu())
        if show:
            print(json.dumps(row))
            save_checkpoint(out / f"encoder_mixed_ep{epoch + 1}.pth", "encoder", encoder,
                            expander={"kind": "expander", "config": expander.config, "model": expander.state_dict()},
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                            epoch=epoch + 1, rng=rng_states, stats=stats, args=_plain(vars(args)))
            # rewritten whole from the checkpoint's history, so a resumed run never repeats a line
            atomic_write(out / "encoder_stats.jsonl", lambda f: f.write("".join(json.dumps(s) + "\n" for s in stats).encode()))
            plot_stats(stats, out / "encoder_loss.png")

    # -- probes on held-out episodes, then the final checkpoint the later stages use
    if show:
        z_tr, s_tr = encode_rows(encoder, train, args.probe_frames, device, args.seed)
        z_va, s_va = encode_rows(encoder, val, args.probe_frames, device, args.seed + 1)
        probes = {**probe_report(z_tr, s_tr, z_va, s_va), "effective_rank_val": round(effective_rank(z_va), 2),
                  "latent": args.latent, "epochs": args.epochs}
        print("probes:", json.dumps(probes))
        atomic_write(out / "encoder_probes.json", lambda f: f.write(json.dumps(probes, indent=1).encode()))
        save_checkpoint(out / "encoder_final.pth", "encoder", encoder, epoch=args.epochs, final=True,
                        probes=probes, stats=stats, args=_plain(vars(args)))
    if world > 1:
        dist.destroy_process_group()


def _plain(d: dict) -> dict:
    """Arguments as plain values (safe for weights_only loading)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.set_defaults(out_dir=MODELS_DIR)
    g = add_data_args(p)
    g.add_argument("--strict", action="store_true", help="a bad episode file is an error, not a warning")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=None, help="ResNet base width (64 = ResNet18)")
    g.add_argument("--latent", type=int, default=None, help="latent size D")
    g.add_argument("--expander", type=int, default=None, help="VICReg expander width")
    g.add_argument("--hud", default="mask_score", choices=HUD_MODES,
                   help="what the encoder sees of the heads-up display")
    g.add_argument("--no-coords", action="store_true", help="no pixel-coordinate input channels")
    g.add_argument("--pool", default="avg", choices=["avg", "flatten"],
                   help="global average pool, or a linear map of the whole final feature map")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--batches-per-epoch", type=int, default=None, help="default: one pass over the frames")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate per 256 samples")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"])
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    g.add_argument("--probe-frames", type=int, default=None, help="frames per split for the final probes")
    g = p.add_argument_group("views")
    # Defaults chosen by the held-out probes (README, "What the encoder sees"): shifts and zooms made
    # the latent blind to speed and position; a temporally close frame as the positive pair helped most.
    g.add_argument("--shift", type=float, default=0.0, help="max shift in pixels")
    g.add_argument("--scale-min", type=float, default=1.0, help="min zoom factor (1 = no zoom)")
    g.add_argument("--jitter", type=float, default=0.1, help="brightness/contrast/saturation jitter")
    g.add_argument("--temporal", type=int, default=2,
                   help="if > 0, the second view is a frame 1..N control steps later in the same episode")
    g = p.add_argument_group("loss")
    g.add_argument("--inv", type=float, default=25.0)
    g.add_argument("--var", type=float, default=25.0)
    g.add_argument("--cov", type=float, default=1.0)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
