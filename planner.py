"""The energy-based MPC planner that drive_mpc.py drives with: MPCPolicy (and PriorPolicy, the prior alone).

    from planner import MPCPolicy
    policy = MPCPolicy(encoder, predictor, cost, "cpu", planner="icem", prior=prior)
    policy.reset(np.random.default_rng(0))
    action, info = policy.act(frame)          # frame [64,64,3] uint8 -> env action [3], {"energy", "plan_ms"}

Each control step the MPC (1) encodes the camera frame, (2) dreams `samples` action sequences of H
steps from power-law coloured noise around a starting plan, (3) unrolls the predictor for all of them in
one batch, (4) sums the energy of every predicted transition, and (5) executes the first action of the
lowest-energy sequence for one control period. The starting plan is the expert prior's own drive dreamt
through the predictor (train_prior.py; --prior none: the previous plan shifted by one step, as in the seed),
and the energy adds how far each plan strays from what the prior would do in its dreamt states.
Only the camera frame reaches the planner. Building the models from checkpoints, the evaluation and the
command line are drive_mpc.py's.
"""
from __future__ import annotations

import time

import numpy as np

from carenv import colored_noise, longitudinal_to_action
from presets import reuse_freed_memory


def plan_dtype(precision: str, device):
    """fp32 | bf16 | auto -> the dtype of the dream's layers. auto: bfloat16 on a CPU that multiplies in it
    natively (AVX512-BF16 or AMX), where float32 planning is over the real-time budget (README, "Planning
    time"); float32 elsewhere: emulated bfloat16 is slower, and GPUs plan in time in float32."""
    import torch
    if precision == "auto":
        native = torch.device(device).type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if native else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def compile_dream(choice: str, device, predictor) -> bool:
    """on | off | auto -> whether to torch.compile the dream and its judgment. auto: on a CPU, for models of
    the small size and up (predictor width >= 256), where the fused kernels plan faster (README, "Planning
    time"); compiling takes half a minute, which tiny models' short drives never win back, and a GPU plans
    in time without it (README, "Hardware": on an H200, at the small size, it saved 9-15 ms a decision for
    a minute of compiling)."""
    import torch
    if choice == "auto":
        return torch.device(device).type == "cpu" and predictor.config["hidden"] >= 256
    return choice == "on"


class MPCPolicy:
    """Energy-based receding-horizon planner on the learned world model (camera frames only)."""

    privileged = False

    def __init__(self, encoder, predictor, cost, device, planner: str = "icem", samples: int = 1000,
                 horizon: int = 15, beta: float = 2.0, sigma: float = 0.5, iterations: int = 3,
                 elite_frac: float = 0.1, w_progress: float = 0.0, w_road: float = 0.0, w_expert: float = 1.0,
                 discount: float = 1.0, prior=None, w_prior: float = 10.0, prior_steps: int = 5,
                 precision: str = "fp32", compile: str = "off"):
        import torch
        reuse_freed_memory()            # each plan allocates and frees MBs of activations: keep them for reuse
        self.torch, self.device = torch, device
        self.encoder, self.predictor, self.cost = encoder.eval(), predictor.eval(), cost.eval()
        self.prior, self.w_prior = (prior.eval() if prior is not None else None), w_prior
        if plan_dtype(precision, device) == torch.bfloat16:
            # The dream's matrix work in bfloat16 (README, "Planning time"); the encoder stays float32.
            for model in (predictor, cost, prior):
                if model is not None:
                    model.compute_in(torch.bfloat16)
        self.planner, self.samples, self.horizon, self.beta, self.sigma = planner, samples, horizon, beta, sigma
        self.iterations, self.elite_frac = iterations, elite_frac
        self.history = getattr(predictor, "history", 1)      # past latents the predictor reads beside z_t
        self.w = (w_progress, w_road, w_expert)
        self.discount = torch.tensor([discount ** h for h in range(horizon)], device=device)
        # The prior's term covers the dream's first prior_steps steps only (0: all of them). Read from dreamt
        # states, the prior's steering tells less with every step (README, "Session 39": R^2 against the
        # expert's label 0.31 at step 1, 0.07 at step 5, none from step 8 on): later, the term charges little but noise.
        self.prior_mask = (torch.arange(horizon, device=device) < (prior_steps or horizon)).float()     # [H]
        self.judge, self.prior_dream = self._judge, self._prior_dream
        self.compiled = compile_dream(compile, device, predictor) and self._compile()

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.seen = []                                       # the last history+1 latents, oldest first
        self.plan = np.zeros((self.horizon, 2), np.float32)   # (steer, longitudinal) per step
        self.elites = None

    def energy(self, hist, seqs: np.ndarray):
        """hist [1,history+1,D], seqs [N,H,2] -> energy [N] of each sequence's predicted future."""
        return self.judge(hist, self.torch.from_numpy(seqs).to(self.device))

    def env_actions(self, plan):
        """carenv.longitudinal_to_action in torch, for the dream (compiled with it): plan [...,2] (steer,
        longitudinal) -> [...,3] (steer, gas, brake), the same numbers."""
        lon = plan[..., 1:].clamp(-1, 1)
        return self.torch.cat([plan[..., :1].clamp(-1, 1), lon.clamp_min(0), (-lon).clamp_min(0)], -1)

    def _judge(self, hist, seqs):
        """The dream and its judgment in torch alone (what --compile compiles): hist [1,history+1,D],
        seqs [N,H,2] (steer, longitudinal) -> energy [N]."""
        torch, F = self.torch, self.torch.nn.functional
        n = len(seqs)
        z = self.predictor.rollout(hist.expand(n, -1, -1), self.env_actions(seqs))                   # [N,H,D]
        prev = torch.cat([hist[:, -1:].expand(n, 1, -1), z[:, :-1]], 1)                               # [N,H,D]
        out = self.cost(prev, z)                                                                      # [N,H] each
        p_road = torch.sigmoid(out["road"])
        # Progress counts only while the car is predicted to have stayed on the road so far: a dream that
        # leaves the road at step 3 earns nothing for speed after it (measured: plain summed progress
        # drove off the road for speed).
        survival = torch.cumprod(p_road, 1)
        # -log p rather than 1 - p: it keeps growing the further a dream looks from the road or from
        # expert driving, so a car already off the road still sees which way is better.
        step = (-self.w[0] * out["progress"] * survival + self.w[1] * F.softplus(-out["road"])
                + self.w[2] * F.softplus(-out["expert"]))
        if self.prior is not None and self.w_prior:
            # What the expert would do in each dreamt state: action h is taken in state h, seen with state h-1.
            seen = torch.cat([hist[:, -2:].expand(n, 2, -1), z[:, :-1]], 1)                       # [N,H+1,D]
            want = self.prior(seen[:, :-1], seen[:, 1:]).clamp(-1, 1)                             # [N,H,2]
            step = step + self.w_prior * self.prior_mask * (seqs - want).pow(2).sum(-1)
        return (step * self.discount).sum(1)

    def _compile(self) -> bool:
        """torch.compile the dream of the samples and their judgment (`_judge`) and the prior's dream; True
        where it worked. Where compiling fails (no C++ compiler, say) it says so and planning stays uncompiled.
        It compiles here, on zeros of the shapes the planner sends, so no decision waits for it: each function
        one whole graph (fullgraph: a break in it fails here, and in the tests), a dynamic batch size, and the
        weights frozen into the graph as constants (inductor's `freezing`: they never change while driving)."""
        torch = self.torch
        import torch._inductor.config
        judge = torch.compile(self._judge, dynamic=True, fullgraph=True)
        prior_dream = self._prior_dream if self.prior is None else torch.compile(self._prior_dream, fullgraph=True)
        per = self.samples // self.iterations if self.planner == "icem" else self.samples
        t0 = time.perf_counter()
        try:
            # freezing through the config: measured, torch.compile(options={"freezing": True}) planned no faster
            with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
                hist = torch.zeros(1, self.history + 1, len(self.predictor.mu), device=self.device)
                for n in (per, per + 1):
                    judge(hist, torch.zeros(n, self.horizon, 2, device=self.device))
                if self.prior is not None:
                    prior_dream(hist)
        except Exception as e:                                     # whatever inductor raises, plan uncompiled
            print(f"planning uncompiled: torch.compile failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
            return False
        print(f"dream compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        self.judge, self.prior_dream = judge, prior_dream
        return True

    def prior_plan(self, hist) -> np.ndarray:
        """The prior's closed-loop drive in the dream: hist [1,history+1,D] -> plan [H,2] (steer, longitudinal)."""
        return self.prior_dream(hist).cpu().numpy()

    def _prior_dream(self, hist):
        """prior_plan in torch alone (what --compile compiles): hist [1,history+1,D] -> plan [H,2]."""
        plan = []
        for _ in range(self.horizon):
            a = self.prior(hist[:, -2], hist[:, -1]).clamp(-1, 1)                                     # [1,2]
            plan.append(a)
            hist = self.torch.cat([hist[:, 1:], self.predictor.rollout(hist, self.env_actions(a).view(1, 1, 3))], 1)
        return self.torch.cat(plan)

    def _noise(self, n: int) -> np.ndarray:
        return colored_noise(self.beta, (n, 2, self.horizon), self.rng).transpose(0, 2, 1)            # [n,H,2]

    def _shooting(self, hist):
        seqs = np.clip(self.plan[None] + self.sigma * self._noise(self.samples), -1, 1)
        seqs[0] = self.plan                                                   # the warm start competes too
        e = self.energy(hist, seqs)
        i = int(e.argmin())
        return seqs[i], float(e[i])

    def _icem(self, hist):
        """Iterative CEM with coloured noise: the same total samples split over `iterations` rounds."""
        per = self.samples // self.iterations
        k = max(2, int(self.elite_frac * per))
        mean, std = self.plan.copy(), np.full_like(self.plan, self.sigma)
        kept = None
        if self.elites is not None:                                           # last step's elites, shifted
            kept = np.concatenate([self.elites[:, 1:], self.elites[:, -1:]], 1)
        best, best_e = None, np.inf
        for _ in range(self.iterations):
            seqs = np.clip(mean[None] + std[None] * self._noise(per), -1, 1)
            seqs[0] = mean
            if kept is not None:
                seqs = np.concatenate([seqs, kept])
            e = self.energy(hist, seqs).cpu().numpy()
            order = np.argsort(e)[:k]
            kept = seqs[order[: max(1, k // 2)]]
            if e[order[0]] < best_e:
                best, best_e = seqs[order[0]], float(e[order[0]])
            mean = seqs[order].mean(0)
            std = np.maximum(seqs[order].std(0), 0.05)
        self.elites = kept
        return best, best_e

    def observe(self, frame: np.ndarray):
        """Encode the camera frame: hist [1,history+1,D], oldest first (the first frame stands in for the
        ones before the start). Call in inference mode."""
        z = self.encoder(self.torch.from_numpy(frame[None]).to(self.device)).float()                  # [1,D]
        self.seen = (self.seen or [z] * self.history)[-self.history:] + [z]
        return self.torch.stack(self.seen, 1)

    def act(self, frame: np.ndarray, sim=None):
        torch = self.torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            hist = self.observe(frame)
            if self.prior is not None:
                # Measured (README, "The expert prior"): starting from the prior's dream drove faster and
                # finished laps where the shifted last plan did not; the last plan's elites still compete.
                self.plan = self.prior_plan(hist)
            best, energy = self._icem(hist) if self.planner == "icem" else self._shooting(hist)
        self.plan = np.concatenate([best[1:], best[-1:]]).astype(np.float32)  # receding horizon warm start
        action = longitudinal_to_action(best[0, 0], best[0, 1])
        return action, {"energy": np.float32(energy), "plan_ms": np.float32(1000 * (time.perf_counter() - t0))}


class PriorPolicy:
    """The expert prior driving alone, without the world model: the ablation that shows what planning adds."""

    privileged = False

    def __init__(self, mpc: MPCPolicy):
        self.mpc = mpc

    def reset(self, rng: np.random.Generator) -> None:
        self.mpc.reset(rng)

    def act(self, frame: np.ndarray, sim=None):
        t0 = time.perf_counter()
        with self.mpc.torch.inference_mode():
            hist = self.mpc.observe(frame)
            steer, lon = self.mpc.prior(hist[:, -2], hist[:, -1]).clamp(-1, 1)[0].tolist()
        return longitudinal_to_action(steer, lon), {"plan_ms": np.float32(1000 * (time.perf_counter() - t0))}
