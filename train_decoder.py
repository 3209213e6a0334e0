"""Step 3: watch the encoder's checkpoints and reconstruct frames from its frozen latents, on another device.

    python train_decoder.py &                    # beside train_encoder.py; second GPU if there are two
    python train_decoder.py --once               # only the newest checkpoint, then exit
    python train_decoder.py --device cpu --steps 300

For each new models/encoder_mixed_ep{N}.pth it loads the encoder onto its own device, freezes it,
trains the decoder (warm-started from its previous weights) for --steps batches, and writes
visuals/reconstruct_ep{N}.png (held-out originals above, reconstructions below, four frames from each
source) plus a PSNR line in visuals/decoder_stats.jsonl. The decoder is saved as models/decoder.pth.
It only ever reads the encoder's files, so it never waits on or slows the training. It stops by itself
once a models/encoder_final.pth newer than every epoch checkpoint exists and the last epoch is shown.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_loader import BalancedBatches, EpisodeData
from models import CheckpointError, TinyDecoder, build, load_checkpoint, load_weights, save_checkpoint
from presets import MODELS_DIR, VISUALS_DIR, add_data_args, apply_preset, common_parser, data_dirs
from train_encoder import CKPT_RE

SHOW_PER_SOURCE = 4


def decoder_device(name: str) -> torch.device:
    """auto: the second GPU when there are two (the first trains the encoder), else the GPU, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in 0..1."""
    return float(10 * torch.log10(1.0 / F.mse_loss(x, y).clamp_min(1e-10)))


def checkpoints(models_dir: Path) -> list[tuple[int, int, Path]]:
    """(epoch, mtime_ns, path) of every epoch checkpoint, oldest epoch first.

    The mtime is part of the identity: a new run that rewrites epoch 1 in the same folder is new.
    Temp files of a write in progress never match the name pattern.
    """
    found = [(int(m.group(1)), p.stat().st_mtime_ns, p) for p in models_dir.glob("encoder_mixed_ep*.pth")
             if (m := CKPT_RE.search(p.name))]
    return sorted(found)


def pending(models_dir: Path, done: set) -> list[tuple[int, int, Path]]:
    return [c for c in checkpoints(models_dir) if c[:2] not in done]


def encoder_finished(models_dir: Path) -> bool:
    """True once encoder_final.pth exists and is newer than every epoch checkpoint (not a previous run's)."""
    final = models_dir / "encoder_final.pth"
    found = checkpoints(models_dir)
    return final.exists() and (not found or final.stat().st_mtime_ns >= max(c[1] for c in found))


def save_grid(originals: torch.Tensor, recon: torch.Tensor, path: Path, title: str) -> None:
    """originals, recon: [N,3,64,64] in 0..1 -> PNG with originals on top, reconstructions below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = torch.cat(list(originals), 2)
    bottom = torch.cat(list(recon), 2)
    img = torch.cat([top, bottom], 1).permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    fig = plt.figure(figsize=(img.shape[1] / 40, img.shape[0] / 40 + 0.4))
    plt.imshow(img, interpolation="nearest")
    plt.axis("off")
    plt.title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


class Watcher:
    """Holds the decoder between checkpoints so each one starts from the last one's weights."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        dirs = data_dirs(args)
        self.train = EpisodeData(dirs, "train", args.val_frac, args.seed)
        val = EpisodeData(dirs, "val", args.val_frac, args.seed)
        self.batches = BalancedBatches(self.train, args.batch_size, seed=args.seed, batches_per_epoch=args.steps)
        show = next(BalancedBatches(val, 3 * SHOW_PER_SOURCE, seed=args.seed, batches_per_epoch=1).epoch(0))
        order = np.argsort(show["source"], kind="stable")          # race, recovery, random, left to right
        self.show = torch.from_numpy(show["obs"][order]).to(device)
        held = next(BalancedBatches(val, 256, seed=args.seed + 1, batches_per_epoch=1).epoch(0))
        self.held = torch.from_numpy(held["obs"]).to(device)
        self.decoder, self.opt, self.rounds = None, None, 0

    def handle(self, epoch: int, path: Path) -> dict:
        ckpt = load_checkpoint(path, "encoder", map_location=self.device)
        encoder = build(ckpt, self.device).eval().requires_grad_(False)
        latent = ckpt["config"]["latent"]
        if self.decoder is None or self.decoder.config["latent"] != latent:
            self.decoder = TinyDecoder(latent, self.args.width).to(self.device)
            decoder_path = Path(self.args.models_dir) / "decoder.pth"
            if decoder_path.exists():
                try:
                    load_weights(self.decoder, load_checkpoint(decoder_path, "decoder", self.device))
                except CheckpointError:
                    pass                                          # a decoder for another encoder: start fresh
            self.opt = torch.optim.AdamW(self.decoder.parameters(), lr=self.args.lr)
        self.decoder.train()
        t0, losses = time.perf_counter(), []
        for batch in self.batches.epoch(self.rounds):
            obs = torch.from_numpy(batch["obs"]).to(self.device)
            with torch.no_grad():
                z = encoder(obs)
            target = obs.permute(0, 3, 1, 2).float() / 255
            loss = F.mse_loss(self.decoder(z), target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
        self.rounds += 1
        self.decoder.eval()
        with torch.no_grad():
            held_psnr = psnr(self.decoder(encoder(self.held)), self.held.permute(0, 3, 1, 2).float() / 255)
            recon = self.decoder(encoder(self.show))
        original = self.show.permute(0, 3, 1, 2).float() / 255
        save_grid(original, recon, Path(self.args.out_dir) / f"reconstruct_ep{epoch}.png",
                  f"encoder epoch {epoch}: held-out race | recovery | random (top), reconstruction (bottom); "
                  f"PSNR {held_psnr:.1f} dB")
        save_checkpoint(Path(self.args.models_dir) / "decoder.pth", "decoder", self.decoder,
                        encoder_epoch=epoch, psnr=held_psnr)
        row = {"encoder_epoch": epoch, "psnr_db": round(held_psnr, 2), "train_mse": round(float(np.mean(losses)), 5),
               "steps": len(losses), "seconds": round(time.perf_counter() - t0, 1), "device": str(self.device)}
        with open(Path(self.args.out_dir) / "decoder_stats.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row


def main(args):
    apply_preset(args, "decoder")
    device = decoder_device(args.device)
    torch.manual_seed(args.seed)
    models = Path(args.models_dir)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    watcher, done, failures = None, set(), {}
    while True:
        todo = pending(models, done)
        if args.once:
            todo = todo[-1:]
            if not todo:
                raise SystemExit(f"no encoder checkpoint in {models}: run train_encoder.py first")
        for epoch, mtime, path in todo:
            try:
                watcher = watcher or Watcher(args, device)
                watcher.handle(epoch, path)
                done.add((epoch, mtime))
            except CheckpointError as e:                   # half-copied or corrupt: try again later
                failures[epoch, mtime] = failures.get((epoch, mtime), 0) + 1
                print(f"skipping for now: {e}", flush=True)
                if failures[epoch, mtime] >= args.retries:
                    print(f"giving up on epoch {epoch} after {args.retries} tries", flush=True)
                    done.add((epoch, mtime))
        if args.once:
            return
        if encoder_finished(models) and not pending(models, done):
            print("encoder finished; decoder watcher stops", flush=True)
            return
        time.sleep(args.poll)


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.set_defaults(out_dir=VISUALS_DIR)
    p.add_argument("--models-dir", default=MODELS_DIR, help="where the encoder writes its checkpoints")
    p.add_argument("--once", action="store_true", help="handle the newest checkpoint and exit")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks for new checkpoints")
    p.add_argument("--retries", type=int, default=5, help="tries for a checkpoint that will not load")
    p.add_argument("--steps", type=int, default=None, help="decoder training batches per checkpoint")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="decoder base width")
    p.add_argument("--lr", type=float, default=1e-3)
    add_data_args(p)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
