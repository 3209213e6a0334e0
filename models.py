"""Every network of the pipeline, and the one checkpoint format they share.

    TinyEncoder   uint8 frame [B,64,64,3] -> latent [B,D]          (ResNet18 from torchvision blocks)
    Expander      latent [B,D] -> VICReg embedding [B,E]           (training only)
    TinyDecoder   latent [B,D] -> RGB [B,3,64,64] in 0..1          (debugging the latent by eye)

A checkpoint is one dict: {"format", "kind", "config", "model", ...training state}. `config` rebuilds
the model (`build(ckpt)`), so no later stage needs flags that match an earlier one. Files are written
atomically and read with `torch.load(weights_only=True)`: a checkpoint can hold tensors and plain
values only, never code.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from presets import atomic_write

CHECKPOINT_FORMAT = 1
HUD_ROWS = 8                        # the bottom 8 of 64 rows are the heads-up display (12 of 96)
SCORE_COLS = 10                     # ... whose left 10 columns are the score digits


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or of another kind or architecture."""


def prepare_frames(obs: torch.Tensor, hud: str = "mask_score") -> torch.Tensor:
    """uint8 [B,64,64,3] (or float 0..1 [B,3,64,64]) -> float [B,3,64,64] in 0..1, HUD handled.

    hud: "keep" everything, "mask_score" blanks the score digits (a slow distractor: they encode
    time, not the scene), "mask" blanks the whole HUD bar (speed/steer/yaw gauges included).
    """
    x = obs.permute(0, 3, 1, 2).float().div_(255) if obs.dtype == torch.uint8 else obs
    if hud == "mask_score":
        x = x.clone()
        x[:, :, -HUD_ROWS:, :SCORE_COLS] = 0
    elif hud == "mask":
        x = x.clone()
        x[:, :, -HUD_ROWS:, :] = 0
    elif hud != "keep":
        raise ValueError(f"hud must be keep, mask_score or mask, got {hud!r}")
    return x


class TinyEncoder(nn.Module):
    """ResNet18 (torchvision BasicBlocks, 2-2-2-2) for 64x64 frames: 3x3 stride-2 stem, no max-pool.

    [B,3,64,64] -> stem [B,w,32,32] -> layers [B,8w,4,4] -> global average pool -> [B,8w] -> latent [B,D].
    width=64, latent=512 is the seed's ResNet18; smaller widths make the CPU presets.
    """

    def __init__(self, width: int = 64, latent: int = 512, hud: str = "mask_score"):
        super().__init__()
        self.config = {"width": width, "latent": latent, "hud": hud}
        self.hud = hud
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, c_in = [], width
        for i, c in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c_in == c else nn.Sequential(
                nn.Conv2d(c_in, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))
            layers += [BasicBlock(c_in, c, stride, down), BasicBlock(c, c)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.head = nn.Identity() if latent == 8 * width else nn.Linear(8 * width, latent)
        self.latent = latent

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = prepare_frames(obs, self.hud)
        if x.is_cuda:                        # channels_last helps GPU convolutions; on CPU it was 3x slower
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Expander(nn.Module):
    """VICReg expander: latent [B,D] -> [B,E] through three linear layers (BN + ReLU between)."""

    def __init__(self, latent: int = 512, hidden: int = 2048):
        super().__init__()
        self.config = {"latent": latent, "hidden": hidden}
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class TinyDecoder(nn.Module):
    """latent [B,D] -> linear -> [B,8w,4,4] -> four stride-2 transposed convs -> [B,3,64,64] in 0..1."""

    def __init__(self, latent: int = 512, width: int = 64):
        super().__init__()
        self.config = {"latent": latent, "width": width}
        self.width = width
        self.fc = nn.Linear(latent, 8 * width * 16)
        chans = [8 * width, 4 * width, 2 * width, width, width]
        ups = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            ups += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*ups, nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(-1, 8 * self.width, 4, 4)
        return torch.sigmoid(self.up(x))


MODELS = {"encoder": TinyEncoder, "expander": Expander, "decoder": TinyDecoder}


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, kind: str, model: nn.Module, **state) -> None:
    """Write {"format", "kind", "config", "model", **state} atomically (temp file + rename)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}")
    raw = model.module if hasattr(model, "module") else model        # unwrap DDP / compile
    raw = getattr(raw, "_orig_mod", raw)
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": kind, "config": dict(raw.config),
            "model": raw.state_dict(), **state}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location="cpu", stage: str = "") -> dict:
    """Read a checkpoint safely (weights_only=True). `stage` names the script that makes it, for errors."""
    path = Path(path)
    hint = f" (run {stage} first)" if stage else ""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}){hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not a TinyAutoJEPA checkpoint (format {CHECKPOINT_FORMAT}){hint}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path} holds a {ckpt['kind']}, expected a {kind}{hint}")
    return ckpt


def build(ckpt: dict, device="cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    model = MODELS[ckpt["kind"]](**ckpt["config"])
    load_weights(model, ckpt)
    return model.to(device)


def load_weights(model: nn.Module, ckpt: dict) -> None:
    """Load ckpt["model"] into `model`; a different architecture is an error that names the difference."""
    own = model.config if hasattr(model, "config") else {}
    if ckpt.get("config") != own:
        diff = {k: (ckpt["config"].get(k), own.get(k)) for k in set(own) | set(ckpt["config"])
                if ckpt["config"].get(k) != own.get(k)}
        raise CheckpointError(f"checkpoint {ckpt['kind']} has another architecture: "
                              + ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items())))
    model.load_state_dict(ckpt["model"])


# ---------------------------------------------------------------- linear probes
PROBE_TARGETS = ("speed", "yaw_rate", "lateral", "heading_err")
NEAR_ROAD = 15.0        # lateral/heading are probed within this many units of the centre line (road: +-6.7)


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(t - mu) / sd for t in (train, *others)]


def ridge_r2(x_tr, y_tr, x_va, y_va, lambdas=(1e-2, 1e-1, 1.0, 10.0, 100.0)) -> float:
    """Held-out R^2 of ridge regression; the penalty is picked on the last fifth of the training set."""
    x_tr, x_va = _standardise(x_tr.double(), x_va.double())
    y_tr, y_va = y_tr.double(), y_va.double()
    cut = max(1, int(0.8 * len(x_tr)))

    def fit(x, y, lam):
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        a = xb.T @ xb + lam * torch.eye(xb.shape[1], dtype=x.dtype)
        return torch.linalg.solve(a, xb.T @ y)

    def r2(w, x, y):
        pred = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w
        return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-12))

    best = max(lambdas, key=lambda lam: r2(fit(x_tr[:cut], y_tr[:cut], lam), x_tr[cut:], y_tr[cut:]))
    return r2(fit(x_tr, y_tr, best), x_va, y_va)


def logistic_accuracy(x_tr, y_tr, x_va, y_va, steps: int = 200) -> float:
    """Held-out accuracy of L2-regularised logistic regression (full-batch L-BFGS)."""
    x_tr, x_va = _standardise(x_tr.float(), x_va.float())
    w = torch.zeros(x_tr.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    y = y_tr.float()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_tr @ w[:-1] + w[-1], y) + 1e-3 * w[:-1].pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((x_va @ w[:-1] + w[-1] > 0).float() == y_va.float()).float().mean())


def probe_report(z_tr: torch.Tensor, s_tr: dict, z_va: torch.Tensor, s_va: dict) -> dict:
    """Linear probes from latents [N,D] to privileged state (dicts of [N] tensors); fit on train, scored on val.

    R^2 for speed, yaw rate, lateral offset and heading error (the last two near the road, where the
    road is in view), accuracy for on-road vs grass, with the majority-class accuracy for reference.
    """
    out = {}
    for key in PROBE_TARGETS:
        m_tr, m_va = torch.ones(len(z_tr), dtype=torch.bool), torch.ones(len(z_va), dtype=torch.bool)
        if key in ("lateral", "heading_err"):
            m_tr, m_va = s_tr["lateral"].abs() < NEAR_ROAD, s_va["lateral"].abs() < NEAR_ROAD
        out[f"{key}_r2"] = round(ridge_r2(z_tr[m_tr], s_tr[key][m_tr], z_va[m_va], s_va[key][m_va]), 4)
    out["on_road_acc"] = round(logistic_accuracy(z_tr, s_tr["on_road"], z_va, s_va["on_road"]), 4)
    share = float(s_va["on_road"].float().mean())
    out["on_road_majority_acc"] = round(max(share, 1 - share), 4)
    out["n_train"], out["n_val"] = len(z_tr), len(z_va)
    return out
