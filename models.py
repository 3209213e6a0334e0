"""Every network of the pipeline, and the one checkpoint format they share.

    TinyEncoder   uint8 frame [B,64,64,3] -> latent [B,D]          (ResNet18 basic blocks)
    Expander      latent [B,D] -> VICReg embedding [B,E]           (training only)
    TinyDecoder   latent [B,D] -> RGB [B,3,64,64] in 0..1          (debugging the latent by eye)
    Predictor     (z_{t-1}, z_t, a_t) -> z_{t+1}                    (the dream)
    CostModel     (z_t, z_{t+1}) -> expert / on-road / progress      (the judge)
    ExpertPrior   (z_{t-1}, z_t) -> the expert's (steer, longitudinal) (the planner's first guess)

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

from presets import HUD_MODES, atomic_write

CHECKPOINT_FORMAT = 1
HUD_ROWS = 8                        # the bottom 8 of 64 rows are the heads-up display (12 of 96)
SCORE_COLS = 7                      # ... whose left 7 columns are the score digits (the speed bar is at 8-9)
STEER_GAUGE = (slice(56, 62), slice(24, 40))   # ... rows, columns of the steering gauge (the green bar: 57-60, 25-38)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or of another kind or architecture."""


def prepare_frames(obs: torch.Tensor, hud: str = "mask_score") -> torch.Tensor:
    """uint8 [B,64,64,3] (or float 0..1 [B,3,64,64]) -> float [B,3,64,64] in 0..1, HUD handled.

    hud: "keep" everything, "mask_score" blanks the score digits (a slow distractor: they encode
    time, not the scene), "mask_steer" the digits and the steering gauge (the front wheels' angle, an echo
    of the steering already held, which a prior cloned from the expert learned to copy: README, "Session
    42"), "mask" the whole HUD bar (speed/steer/yaw gauges included).
    """
    x = obs.permute(0, 3, 1, 2).float().div_(255) if obs.dtype == torch.uint8 else obs
    if hud in ("mask_score", "mask_steer"):
        x = x.clone()
        x[:, :, -HUD_ROWS:, :SCORE_COLS] = 0
        if hud == "mask_steer":
            x[:, :, STEER_GAUGE[0], STEER_GAUGE[1]] = 0
    elif hud == "mask":
        x = x.clone()
        x[:, :, -HUD_ROWS:, :] = 0
    elif hud != "keep":
        raise ValueError(f"hud must be one of {HUD_MODES}, got {hud!r}")
    return x


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): two 3x3 convs with batch norm, plus the input (or its 1x1
    projection when the shape changes). [B,c_in,H,W] -> [B,c,H/stride,W/stride].

    Written here rather than imported from torchvision because importing torchvision costs every stage's
    process about 1.5 s (it pulls in torch._dynamo); the names of its parts are torchvision's, so a
    checkpoint's weights load either way (tests/test_encoder.py checks both against torchvision's block).
    """

    def __init__(self, c_in: int, c: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + skip)


class TinyEncoder(nn.Module):
    """ResNet18 (basic blocks, 2-2-2-2) for 64x64 frames: 3x3 stride-2 stem, no max-pool.

    [B,3(+2 coordinate),64,64] -> stem [B,w,32,32] -> layers [B,8w,4,4] -> global average pool -> [B,8w]
    -> latent [B,D].
    width=64, latent=512 is the seed's ResNet18; smaller widths make the CPU presets.
    """

    def __init__(self, width: int = 64, latent: int = 512, hud: str = "mask_score", coords: bool = True,
                 pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be avg or flatten, got {pool!r}")
        self.config = {"width": width, "latent": latent, "hud": hud, "coords": coords, "pool": pool}
        self.pool = pool
        self.hud, self.coords = hud, coords
        # Pixel coordinates as two extra input channels (CoordConv, Liu et al. 2018): the camera follows
        # the car, so *where* the road is in the frame is the lateral offset and heading, and a globally
        # pooled latent keeps that only if the features can say where they are.
        self.stem = nn.Sequential(nn.Conv2d(3 + 2 * coords, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, c_in = [], width
        for i, c in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c_in == c else nn.Sequential(
                nn.Conv2d(c_in, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))
            layers += [BasicBlock(c_in, c, stride, down), BasicBlock(c, c)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        # "avg": the seed's global average pool; "flatten": a linear map of the whole [8w,4,4] map, which
        # keeps where things are (the probes decide; README, "What the encoder sees").
        feat = 8 * width * (16 if pool == "flatten" else 1)
        self.head = nn.Identity() if latent == feat else nn.Linear(feat, latent)
        self.latent = latent

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = prepare_frames(obs, self.hud)
        if self.coords:
            ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device, dtype=x.dtype)
            grid = torch.stack([ramp.view(1, -1).expand(x.shape[-2], -1), ramp.view(-1, 1).expand(-1, x.shape[-1])])
            x = torch.cat([x, grid.expand(len(x), -1, -1, -1)], 1)                 # [B,5,64,64]
        if x.is_cuda:                        # channels_last helps GPU convolutions; on CPU it was 3x slower
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.layers(self.stem(x))                                            # [B,8w,4,4]
        if self.pool == "avg":
            x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


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


class Standardised(nn.Module):
    """A network on latents standardised with its training set's mean/std, held as buffers `mu`, `sd` [dim],
    so training and planning normalise identically."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))

    def set_normalisation(self, mu: torch.Tensor, sd: torch.Tensor) -> None:
        self.mu.copy_(mu)
        self.sd.copy_(sd.clamp_min(1e-6))

    def compute_in(self, dtype: torch.dtype) -> "Standardised":
        """Run the layers in `dtype` (e.g. bfloat16 for planning) while inputs, outputs, the normalisation
        and the predictor's running state stay float32: only the matrix work is rounded."""
        for child in self.children():
            child.to(dtype)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class Predictor(Standardised):
    """Latent dynamics: (z_{t-history} .. z_t, a_t) -> z_{t+1}, predicted as a residual change of z_t.

    A single frame shows the speed gauge but hardly the yaw or the drift; the previous control step's
    latent alongside the current one gives the motion (history=1). Latents are standardised with the
    training set's mean/std held as buffers, so training and planning normalise identically.
    """

    def __init__(self, latent: int = 512, hidden: int = 1024, layers: int = 3, history: int = 1, action_dim: int = 3):
        super().__init__(latent)
        self.config = {"latent": latent, "hidden": hidden, "layers": layers, "history": history,
                       "action_dim": action_dim}
        self.history = history
        dims = [latent * (history + 1) + action_dim] + [hidden] * layers
        blocks = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, latent))
        nn.init.zeros_(self.net[-1].weight)                        # starts as "nothing changes"
        nn.init.zeros_(self.net[-1].bias)

    def rollout(self, z_hist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z_hist [B,history+1,D] (oldest first), actions [B,H,3] -> predicted latents [B,H,D].

        Step h feeds on the model's own predictions of steps < h: H calls of the network.
        """
        n = (z_hist - self.mu) / self.sd
        dt, out = self.compute_dtype, []
        for h in range(actions.shape[1]):
            nxt = n[:, -1] + self.net(torch.cat([n.flatten(1), actions[:, h]], 1).to(dt)).float()
            out.append(nxt)
            n = torch.cat([n[:, 1:], nxt[:, None]], 1)
        return torch.stack(out, 1) * self.sd + self.mu


class CostModel(Standardised):
    """The judge: heads on a transition (z_t, z_{t+1}) of true or predicted latents [B,D] each.

    expert: logit that the transition is expert driving (low energy) rather than random (high);
    road:   logit that the car is on the road at t+1;
    progress: track tiles reached during the control period (what the env pays for).
    """

    def __init__(self, latent: int = 512, hidden: int = 256):
        super().__init__(latent)
        self.config = {"latent": latent, "hidden": hidden}
        self.trunk = nn.Sequential(nn.Linear(2 * latent, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.heads = nn.Linear(hidden, 3)

    def forward(self, z_now: torch.Tensor, z_next: torch.Tensor) -> dict:
        x = torch.cat([(z_now - self.mu) / self.sd, (z_next - self.mu) / self.sd], -1)
        out = self.heads(self.trunk(x.to(self.compute_dtype))).float()
        return {"expert": out[..., 0], "road": out[..., 1], "progress": out[..., 2]}


class ExpertPrior(Standardised):
    """The planner's first guess: (z_{t-1}, z_t) [B,D] each -> the expert's action at t [B,2] as
    (steer, longitudinal) in [-1, 1] (longitudinal: gas positive, brake negative), by behaviour cloning.

    The previous latent rides along for the same reason as in the predictor: one frame hardly shows the
    car's motion. `members` > 1 averages networks from different initialisations (single networks cloned
    from a few dozen expert laps drive very differently from one training run to the next; an average of
    four measured no better, README "The expert prior", so presets use one). The output is unbounded
    (trained by mean squared error on targets in [-1, 1]); callers clip it to the action bounds.
    """

    def __init__(self, latent: int = 512, hidden: int = 256, members: int = 1):
        super().__init__(2 * latent)                                # (z_{t-1}, z_t) side by side
        self.config = {"latent": latent, "hidden": hidden, "members": members}
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * latent, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, 2)) for _ in range(members))

    def forward(self, z_prev: torch.Tensor, z_now: torch.Tensor, every: bool = False) -> torch.Tensor:
        """-> [...,2], the members' mean; every=True: [members,...,2], each member's own (for training)."""
        x = (torch.cat([z_prev, z_now], -1) - self.mu) / self.sd
        x = x.to(self.compute_dtype)
        out = torch.stack([net(x) for net in self.nets]).float()
        return out if every else out.mean(0)


MODELS = {"encoder": TinyEncoder, "expander": Expander, "decoder": TinyDecoder, "predictor": Predictor,
          "cost": CostModel, "prior": ExpertPrior}


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
