"""Linear read-outs of latents: what the encoder and the dream hold about the simulator's state.

The probes use simulator state as labels, never as an input to driving: train_encoder.py reports them
after each run (encoder_probes.json), train_predictor.py through the dream (predictor_probes.json).
r2_score is also how train_prior.py and train_cost_model.py score their held-out regressions, and
roc_auc how train_cost_model.py scores the judge's expert head.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PROBE_TARGETS = ("speed", "yaw_rate", "lateral", "heading_err")
NEAR_ROAD = 15.0        # lateral/heading are probed within this many units of the centre line (road: +-6.7)


class LinearProbe:
    """A linear read-out from latents: ridge regression (kind="ridge") or logistic regression ("logistic").

    Inputs are standardised with the training set's statistics; the ridge penalty is picked on the
    last fifth of the training set. fit() on train latents, then score() anywhere (true or predicted latents).
    """

    def __init__(self, kind: str = "ridge"):
        self.kind = kind

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.double() - self.mu) / self.sd
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def fit(self, x: torch.Tensor, y: torch.Tensor, lambdas=(1e-2, 1e-1, 1.0, 10.0, 100.0)) -> "LinearProbe":
        self.mu, self.sd = x.double().mean(0), x.double().std(0) + 1e-6
        if self.kind == "ridge":
            cut = max(1, int(0.8 * len(x)))
            best = max(lambdas, key=lambda lam: r2_score(self._x(x[cut:]) @ self._ridge(x[:cut], y[:cut], lam),
                                                         y[cut:].double()))
            self.w = self._ridge(x, y, best)
        else:
            xb, yb = self._x(x).float(), y.float()
            w = torch.zeros(xb.shape[1], requires_grad=True)
            opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(xb @ w, yb) + 1e-3 * w[:-1].pow(2).sum()
                loss.backward()
                return loss
            opt.step(closure)
            self.w = w.detach().double()
        return self

    def _ridge(self, x, y, lam):
        xb = self._x(x)
        return torch.linalg.solve(xb.T @ xb + lam * torch.eye(xb.shape[1], dtype=xb.dtype), xb.T @ y.double())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The fitted values (ridge) or logits (logistic) [N]."""
        return self._x(x) @ self.w

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scores(x)
        return out if self.kind == "ridge" else (out > 0)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """R^2 (ridge) or accuracy (logistic) on (x, y)."""
        if self.kind == "ridge":
            return r2_score(self.predict(x), y.double())
        return float((self.predict(x) == y.bool()).double().mean())


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - SSE / SST; for [N,K] targets pooled over the K columns, each around its own mean."""
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-12))


def roc_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (Mann-Whitney U), ties halved.
    Takes tensors on any device (the judge is evaluated where it trained; ranks are computed in NumPy)."""
    s, y = score.detach().double().cpu().numpy(), label.bool().cpu().numpy()
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(sorted_s[np.r_[False, sorted_s[1:] == sorted_s[:-1]]]):      # average tied ranks
        ranks[s == v] = ranks[s == v].mean()
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def view_targets(state: dict) -> dict:
    """Lateral offset and heading error as the camera sees them (dict of [N] tensors -> dict of [N]).

    A frame shows the road around the car, and which way the track runs only faintly (facing_forward).
    For a car facing against the track (|heading error| > pi/2) the track-frame lateral offset has the
    opposite sign to the offset the frame shows, and its heading error differs by pi from the angle between
    the nose and the road's axis. So besides the track-frame labels the probes read:
    - lateral_view: offset from the centre line towards the car's right (= lateral when facing forward);
    - heading_view: heading error folded into [-pi/2, pi/2] (the nose against the road's axis, + = left);
    - heading_axial [N,2]: (cos 2h, sin 2h), the same angle without the fold's jump at +-pi/2. The road's
      axis is a line, so its angle to the nose is defined modulo pi; a road square across the car looks the
      same at +pi/2 and -pi/2, where heading_view jumps from one end of its range to the other. The doubled
      angle is the continuous encoding of such an angle (sin 2h ~ 2h near 0: left/right as in heading_view).
    """
    h = state["heading_err"].double()
    backwards = ~facing_forward(h)
    return {"lateral_view": torch.where(backwards, -state["lateral"].double(), state["lateral"].double()),
            "heading_view": h - math.pi * torch.round(h / math.pi),
            "heading_axial": torch.stack([torch.cos(2 * h), torch.sin(2 * h)], -1)}


def facing_forward(heading_err: torch.Tensor) -> torch.Tensor:
    """Whether the car faces along the track rather than against it, [N] -> bool [N].

    Probed only near the road (|lateral| < NEAR_ROAD), where the road is in view. A frame shows it only
    faintly: tiles not yet visited keep a three-tile shading (road grey + 0, 2.55, 5.1 of 255, rising along
    the track) that the simulator repaints plain grey once the car has touched them.
    """
    return torch.cos(heading_err) >= 0


def probe_report(z_tr: torch.Tensor, s_tr: dict, z_va: torch.Tensor, s_va: dict) -> dict:
    """Linear probes from latents [N,D] to privileged state (dicts of [N] tensors); fit on train, scored on val.

    R^2 for speed, yaw rate, lateral offset and heading error (the last two near the road, where the
    road is in view, in the track's frame and as the camera sees them: view_targets, where heading_axial
    is one ridge probe on the pair (cos 2h, sin 2h) with R^2 pooled over both), accuracy for on-road vs
    grass with the majority-class accuracy for reference, and for facing along vs against the track near
    the road (facing_forward) the balanced accuracy and ROC AUC.
    """
    out = {}
    near_tr, near_va = s_tr["lateral"].abs() < NEAR_ROAD, s_va["lateral"].abs() < NEAR_ROAD
    v_tr, v_va = view_targets(s_tr), view_targets(s_va)
    # A heading is an angle: a car facing backwards is at +-pi, one value the raw number splits in two,
    # so sin(heading) is reported too (left/right of the track direction, continuous everywhere).
    regressions = [(key, s_tr[key], s_va[key], key in ("lateral", "heading_err")) for key in PROBE_TARGETS]
    regressions += [("heading_sin", torch.sin(s_tr["heading_err"]), torch.sin(s_va["heading_err"]), True),
                    *((key, v_tr[key], v_va[key], True) for key in v_tr)]
    for key, y_tr, y_va, near in regressions:
        m_tr = near_tr if near else torch.ones(len(z_tr), dtype=torch.bool)
        m_va = near_va if near else torch.ones(len(z_va), dtype=torch.bool)
        probe = LinearProbe("ridge").fit(z_tr[m_tr], y_tr[m_tr])
        out[f"{key}_r2"] = round(probe.score(z_va[m_va], y_va[m_va]), 4)
    fwd = facing_forward(s_va["heading_err"][near_va])
    out["facing_backwards_share_val"] = round(float((~fwd).double().mean()), 4)
    # Few frames face against the track (6% of a small run's near the road), so accuracy says little:
    # the balanced accuracy (mean of both classes' recall) and the ROC AUC of the probe's logit.
    probe = LinearProbe("logistic").fit(z_tr[near_tr], facing_forward(s_tr["heading_err"][near_tr]))
    logit = probe.scores(z_va[near_va])
    if fwd.any() and not fwd.all():
        out["facing_forward_auc"] = round(roc_auc(logit, fwd), 4)
        out["facing_forward_balanced_acc"] = round(0.5 * float((logit[fwd] > 0).double().mean()
                                                               + (logit[~fwd] <= 0).double().mean()), 4)
    probe = LinearProbe("logistic").fit(z_tr, s_tr["on_road"])
    out["on_road_acc"] = round(probe.score(z_va, s_va["on_road"]), 4)
    share = float(s_va["on_road"].float().mean())
    out["on_road_majority_acc"] = round(max(share, 1 - share), 4)
    out["n_train"], out["n_val"] = len(z_tr), len(z_va)
    return out
