"""Step 5: watch the world model dream: decoded predicted futures beside the real one, as a GIF.

    python visualise_dream.py                            # models/*.pth -> output_dream.gif
    python visualise_dream.py --starts 6 --horizon 30    # more start frames, dream past the trained horizon
    python visualise_dream.py --out-dir visuals --out dream.gif

Picks --starts frames t from held-out (val) episodes, taking race, recovery and random in turn, and
rolls the predictor out from (z_{t-history} .. z_t) for H steps under four action sequences: the
actions really taken, and hard left / straight at full throttle / hard right held for all H steps.
Each GIF frame is a grid, one row per start frame, five panels per row:

    real | dream: real actions | dream: hard left | dream: straight, full throttle | dream: hard right

where "real" is the stored frame of row t+h and a dream is decoder(predicted latent of step h); at
h=0 every dream shows decoder(z_t). The GIF has H+1 frames, h = 0..H. A relative --out is written
inside --out-dir (default: the current folder). Latents come from the same latent cache as
train_predictor.py, so use the --seed and --val-frac it was trained with to show truly held-out
frames. --preset, --workers and --resume have no effect here: sizes come from the checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data_loader import LatentCache
from models import Predictor, TinyDecoder, build, load_checkpoint
from presets import CONTROL_PERIOD, MODELS_DIR, add_data_args, common_parser, data_dirs, pick_device
from train_predictor import latent_caches
from video import write_video

# Held actions (steer -1 left..+1 right, gas, brake); a little gas in the turns so the car keeps moving.
ACTIONS = {"hard left": (-1.0, 0.3, 0.0), "straight, full throttle": (0.0, 1.0, 0.0), "hard right": (1.0, 0.3, 0.0)}
PANELS = ("real", "dream: real actions", *(f"dream: {name}" for name in ACTIONS))

# Layout in pixels: a header line with the step, then per start frame a label strip above each panel.
SCALE = 3                       # 64x64 frames shown 3x larger (nearest-neighbour) so the labels fit beside them
TILE = 64 * SCALE
LABEL_H = 14                    # the default font is ~12 px tall
HEADER_H = 18
GAP = 4                         # between panels and rows, and around the grid
FRAME_MS = 250                  # per GIF frame; the last one is held 4x so the loop's end is visible
BACKGROUND, TEXT = (30, 30, 30), (235, 235, 235)


def pick_starts(val: LatentCache, n: int, horizon: int, seed: int) -> list[tuple[int, int]]:
    """n (source, row t) pairs with rows t .. t+horizon in one held-out episode (the history before an
    episode's first row repeats it, LatentCache.gather); sources in turn."""
    rng = np.random.default_rng(seed)
    pools = {s: p for s in range(len(val.data.names)) if len(p := val.windows(s, horizon))}
    if not pools:
        raise SystemExit(f"no held-out episode has {horizon + 1} control steps: lower --horizon")
    turn = [list(pools)[i % len(pools)] for i in range(n)]
    picked = []
    for s in pools:
        k = turn.count(s)
        picked += [(s, int(t)) for t in np.sort(rng.choice(pools[s], k, replace=k > len(pools[s])))]
    return picked


def gather_starts(val: LatentCache, starts: list, horizon: int, history: int) -> tuple:
    """-> latents [N,history+1,D] (t-history .. t), real actions [N,H,3], real frames uint8 [N,H+1,64,64,3] (t .. t+H)."""
    z, actions, real = [], [], []
    for s, t in starts:
        w = val.gather(s, np.array([t]), horizon, history)
        z.append(w["z"][0, :history + 1])
        actions.append(w["action"][0])
        real.append(val.data.caches[s].frame_runs(np.array([t]), horizon + 1)[0])
    return torch.from_numpy(np.stack(z)), torch.from_numpy(np.stack(actions)), np.stack(real)


@torch.no_grad()
def dream(predictor: Predictor, decoder: TinyDecoder, z: torch.Tensor, real_actions: torch.Tensor) -> np.ndarray:
    """z [N,history+1,D], real_actions [N,H,3] -> uint8 [N,1+len(ACTIONS),H+1,64,64,3]: decoded rollouts
    under the real actions, then under each held action of ACTIONS; step 0 of each is decoder(z_t)."""
    n, h = real_actions.shape[:2]
    held = torch.tensor(list(ACTIONS.values()), dtype=real_actions.dtype, device=real_actions.device)   # [A,3]
    acts = torch.cat([real_actions[None], held[:, None, None].expand(-1, n, h, -1)])                  # [1+A,N,H,3]
    a = len(acts)
    pred = predictor.rollout(z.repeat(a, 1, 1), acts.flatten(0, 1))                                   # [(1+A)N,H,D]
    seq = torch.cat([z[:, -1:].repeat(a, 1, 1), pred], 1)                                             # [(1+A)N,H+1,D]
    img = decoder(seq.flatten(0, 1)).clamp(0, 1).mul(255).round().to(torch.uint8)                    # [(1+A)N(H+1),3,64,64]
    img = img.permute(0, 2, 3, 1).reshape(a, n, h + 1, 64, 64, 3)
    return img.transpose(0, 1).cpu().numpy()


def render(panels: np.ndarray, labels: list[list[str]], header) -> list[np.ndarray]:
    """panels uint8 [N,P,H+1,64,64,3], labels [N][P], header(h) -> str  ->  H+1 GIF frames uint8 [height,width,3]."""
    n, p, steps = panels.shape[:3]
    font = ImageFont.load_default()
    big = panels.repeat(SCALE, axis=3).repeat(SCALE, axis=4)                 # [N,P,H+1,TILE,TILE,3]
    frames = []
    for h in range(steps):
        canvas = Image.new("RGB", (GAP + p * (TILE + GAP), HEADER_H + n * (LABEL_H + TILE + GAP)), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        draw.text((GAP, 3), header(h), fill=TEXT, font=font)
        for i in range(n):
            y = HEADER_H + i * (LABEL_H + TILE + GAP)
            for j in range(p):
                x = GAP + j * (TILE + GAP)
                draw.text((x, y), labels[i][j], fill=TEXT, font=font)
                canvas.paste(Image.fromarray(big[i, j, h]), (x, y + LABEL_H))
        frames.append(np.asarray(canvas))
    return frames


def main(args):
    if Path(args.out).suffix != ".gif":
        raise SystemExit(f"--out {args.out}: the dream is written as a GIF; give a .gif path")
    device = torch.device(pick_device(args.device))
    # Checkpoints first, so a missing one fails before any encoding work.
    pred_ckpt = load_checkpoint(args.predictor, "predictor", map_location=device, stage="train_predictor.py")
    dec_ckpt = load_checkpoint(args.decoder, "decoder", map_location=device, stage="train_decoder.py")
    dirs = data_dirs(args)
    _, val, enc_ckpt = latent_caches(args.encoder, dirs, args.val_frac, args.seed, device)
    if pred_ckpt.get("encoder_hash", val.key) != val.key:
        raise SystemExit(f"{args.predictor} was trained on another encoder than {args.encoder}")
    latent = enc_ckpt["config"]["latent"]
    for path, ckpt in ((args.predictor, pred_ckpt), (args.decoder, dec_ckpt)):
        if ckpt["config"]["latent"] != latent:
            raise SystemExit(f"{path} works on {ckpt['config']['latent']}-dim latents, {args.encoder} gives {latent}")
    predictor, decoder = build(pred_ckpt, device).eval(), build(dec_ckpt, device).eval()
    horizon = args.horizon or pred_ckpt.get("horizon", 15)

    starts = pick_starts(val, args.starts, horizon, args.seed)
    z, actions, real = gather_starts(val, starts, horizon, predictor.history)
    dreams = dream(predictor, decoder, z.to(device), actions.to(device))                  # [N,4,H+1,64,64,3]
    panels = np.concatenate([real[:, None], dreams], 1)                                    # [N,5,H+1,64,64,3]
    labels = [[f"real: {val.data.names[s]}", *PANELS[1:]] for s, _ in starts]
    seconds = (val.data.k or CONTROL_PERIOD) * 0.02                                       # one control step at 50 fps
    frames = render(panels, labels, lambda h: f"t+{h}   ({h * seconds:.2f} s ahead)   "
                    "dream = decoder(predicted latent); at t+0 every dream is decoder(z_t)")
    out = Path(args.out_dir or ".") / args.out
    # The header differs on every frame, so the GIF writer never merges two frames into one.
    write_video(out, frames, loop=0, duration=[FRAME_MS] * horizon + [4 * FRAME_MS])
    print(f"wrote {out}: {len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}, "
          f"{len(starts)} held-out starts, horizon {horizon}")


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="output_dream.gif", help="the GIF; a relative path is inside --out-dir")
    p.add_argument("--encoder", default=f"{MODELS_DIR}/encoder_final.pth", help="the predictor's frozen encoder")
    p.add_argument("--predictor", default=f"{MODELS_DIR}/predictor_final.pth", help="from train_predictor.py")
    p.add_argument("--decoder", default=f"{MODELS_DIR}/decoder.pth", help="from train_decoder.py")
    p.add_argument("--starts", type=int, default=4, help="held-out start frames, one grid row each")
    p.add_argument("--horizon", type=int, default=None,
                   help="dream length H; unset: the predictor's training horizon, else 15")
    add_data_args(p)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
