"""CarRacing-v3 helpers shared by collection, evaluation and driving.

- `make_env`, `to_model_frame`: the env and the 96x96 -> 64x64 frame every model sees.
- `sim_state`: privileged per-frame state (speed, yaw rate, on-road, lateral offset, heading error,
  tiles). It labels data and measures models; no driving model reads it.
- `Expert`: the pure-pursuit racing driver that reads the track geometry (privileged by design).
- `run_episode`: one episode at control period k, used by every collector and by drive_mpc.py; it labels
  every step with the expert's action for that state (a privileged label: what the expert would do there).

Run this file to measure the expert quickly:  python carenv.py --seed 500 --episodes 4
"""
from __future__ import annotations

import math
import os
import sys

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no screen: pygame must not try to open one

import numpy as np

from data_loader import COLUMNS
from presets import CONTROL_PERIOD

ENV_ID = "CarRacing-v3"
FRAME = 64                    # models see FRAME x FRAME x 3 uint8
ZOOM_FRAMES = 50              # the camera zooms in during the first second (50 frames) after reset
NOOP = np.zeros(3, np.float32)
WHEELBASE = 3.24              # front to rear axle, Box2D units (car_dynamics: (80 + 82) * 0.02)
MAX_WHEEL_ANGLE = 0.4         # steering joint limit, radians


def make_env(render_mode: str | None = None):
    import gymnasium as gym
    return gym.make(ENV_ID, render_mode=render_mode, continuous=True,
                    domain_randomize=False, lap_complete_percent=0.95)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights: output pixel j averages the input span it covers (exact area resampling)."""
    w = np.zeros((n_out, n_in), np.float32)
    scale = n_in / n_out
    for j in range(n_out):
        lo, hi = j * scale, (j + 1) * scale
        for i in range(int(lo), min(n_in, math.ceil(hi))):
            w[j, i] = min(hi, i + 1) - max(lo, i)
    return w / scale


_AREA = _area_matrix(96, FRAME)


def to_model_frame(obs: np.ndarray) -> np.ndarray:
    """[96,96,3] uint8 env frame -> [64,64,3] uint8 by area averaging (same code in collection and driving)."""
    x = obs.astype(np.float32)                                   # [96,96,3]
    out = np.einsum("lk,jkc->jlc", _AREA, np.einsum("ji,ikc->jkc", _AREA, x))  # rows, then columns
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- track geometry and privileged state
class Track:
    """Centre line of the current track as arrays: points [N,2], unit directions [N,2], arc length [N]."""

    def __init__(self, sim):
        self.points = np.array([(t[2], t[3]) for t in sim.track], np.float64)
        seg = np.roll(self.points, -1, axis=0) - self.points           # [N,2], segment i -> i+1
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.dirs = seg / self.seg_len[:, None]
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)[:-1]])
        self.length = float(self.seg_len.sum())
        heading = np.arctan2(self.dirs[:, 1], self.dirs[:, 0])
        dtheta = np.angle(np.exp(1j * (np.roll(heading, -1) - heading)))
        self.curvature = dtheta / self.seg_len                          # [N], 1/units, + = left turn
        self.id = id(sim.track)

    def project(self, pos: np.ndarray):
        """Nearest segment index, signed lateral offset (+ = right of the centre line) and its direction."""
        d = pos[None, :] - self.points
        t = np.clip(np.einsum("ij,ij->i", d, self.dirs), 0, self.seg_len)
        foot = self.points + t[:, None] * self.dirs
        i = int(np.argmin(np.sum((pos - foot) ** 2, axis=1)))
        rel = pos - foot[i]
        right = np.array([self.dirs[i, 1], -self.dirs[i, 0]])
        return i, float(rel @ right), self.dirs[i], float(self.s[i] + t[i])

    def point_at(self, s: float) -> np.ndarray:
        s = s % self.length
        i = int(np.searchsorted(self.s, s, side="right") - 1)
        return self.points[i] + (s - self.s[i]) * self.dirs[i]


def _track(sim) -> Track:
    cached = getattr(sim, "_tinyjepa_track", None)
    if cached is None or cached.id != id(sim.track):
        cached = Track(sim)
        sim._tinyjepa_track = cached
    return cached


def car_forward(sim) -> np.ndarray:
    a = sim.car.hull.angle
    return np.array([-math.sin(a), math.cos(a)])                      # Box2D local +y is the car's nose


STATE_KEYS = ("speed", "yaw_rate", "on_road", "lateral", "heading_err", "tiles")


def sim_state(sim) -> dict:
    """Privileged state of the car now. For labels, probes and evaluation only."""
    car = sim.car
    pos = np.array(car.hull.position, np.float64)
    _, lateral, direction, _ = _track(sim).project(pos)
    fwd = car_forward(sim)
    heading_err = math.atan2(direction[0] * fwd[1] - direction[1] * fwd[0], direction @ fwd)  # + = nose left
    return {
        "speed": float(np.hypot(*car.hull.linearVelocity)),
        "yaw_rate": float(car.hull.angularVelocity),
        "on_road": bool(any(len(w.tiles) for w in car.wheels)),
        "lateral": lateral,
        "heading_err": heading_err,
        "tiles": int(sim.tile_visited_count),
    }


# ---------------------------------------------------------------- the expert
ROAD_HALF_WIDTH = 40 / 6.0    # car_racing TRACK_WIDTH: centre line to road edge, Box2D units


class Expert:
    """Pure pursuit on a minimum-curvature racing line, with a grip-limited speed profile.

    Line: the centre line shifted sideways (at most `margin` inside the road edge) to minimise squared
    curvature, so it cuts to the inside of corners and corners can be taken faster.
    Speed: each line point allows sqrt(a_lat / |curvature|); a backward pass lowers that so the car
    can brake from one point to the next at a_brake, which makes it brake *before* corners.
    Steering: pure pursuit towards the line point `lookahead` units ahead (growing with speed), aimed from
    where the car will be `steer_delay` frames later, since steering reacts late to a held action.
    It projects the car onto the track wherever it is, so it also steers back from the grass or from
    a spin and carries on in the track's direction.
    Pedals: proportional to the speed error, with traction control (no gas while the rear wheels spin)
    and anti-lock (no brake while the front wheels skid): a sliding wheel has no grip left for steering.
    """

    privileged = True

    def __init__(self, v_max=100.0, a_lat=190.0, a_brake=120.0, margin=3.5, curvature_window=7,
                 lookahead=7.0, lookahead_per_speed=0.15, steer_delay=2, brake_delay=3, speed_gain=0.1,
                 brake_gain=0.05, brake_max=0.3, slip_max=3.0, offroad_speed=25.0):
        self.v_max, self.a_lat, self.a_brake = v_max, a_lat, a_brake
        self.margin, self.curvature_window = margin, curvature_window
        self.lookahead, self.lookahead_per_speed = lookahead, lookahead_per_speed
        self.steer_delay, self.brake_delay = steer_delay, brake_delay
        self.speed_gain, self.brake_gain, self.brake_max = speed_gain, brake_gain, brake_max
        self.slip_max, self.offroad_speed = slip_max, offroad_speed
        self._plan_for = None

    def reset(self, rng: np.random.Generator | None = None) -> None:
        self._plan_for = None

    def _racing_line(self, track: Track, iters: int = 600) -> np.ndarray:
        """[N] sideways offsets (+ = right) minimising the squared second difference of the shifted points.

        Projected gradient descent with Nesterov momentum (FISTA) on a convex quadratic with box limits.
        """
        tangent = track.dirs + np.roll(track.dirs, 1, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)          # right-hand normal at each point
        limit = ROAD_HALF_WIDTH - self.margin

        def grad(off):
            q = track.points + off[:, None] * normal
            d2 = np.roll(q, 1, axis=0) - 2 * q + np.roll(q, -1, axis=0)
            d4 = np.roll(d2, 1, axis=0) - 2 * d2 + np.roll(d2, -1, axis=0)
            return np.einsum("ij,ij->i", d4, normal)

        off = np.zeros(len(track.points))
        y, t = off.copy(), 1.0
        for _ in range(iters):
            new = np.clip(y - grad(y) / 16.0, -limit, limit)                # 16 bounds the Hessian's norm
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = new + (t - 1) / t_new * (new - off)
            off, t = new, t_new
        return track.points + off[:, None] * normal

    def _plan(self, track: Track) -> None:
        """Racing line, its arc length and the speed profile along it."""
        line = self._racing_line(track)
        seg = np.roll(line, -1, axis=0) - line
        seg_len = np.linalg.norm(seg, axis=1)
        heading = np.arctan2(seg[:, 1], seg[:, 0])
        curv = np.angle(np.exp(1j * (np.roll(heading, -1) - heading))) / seg_len
        # Curvature smoothed over +-w points: the car's real path is smoother than the polygon.
        n, w = len(line), self.curvature_window
        curv = np.convolve(np.concatenate([curv[-w:], curv, curv[:w]]), np.ones(2 * w + 1) / (2 * w + 1),
                           mode="valid")
        v = np.minimum(self.v_max, np.sqrt(self.a_lat / np.maximum(np.abs(curv), 1e-6)))
        for _ in range(2):                                    # twice round: the track is a loop
            for i in range(n - 1, -1, -1):
                v[i] = min(v[i], math.sqrt(v[(i + 1) % n] ** 2 + 2 * self.a_brake * seg_len[i]))
        self.line, self.line_seg, self.profile = line, seg_len, v
        self.line_s = np.concatenate([[0.0], np.cumsum(seg_len)[:-1]])
        self.line_length = float(seg_len.sum())
        self._plan_for = track.id

    def _line_point(self, s: float) -> np.ndarray:
        s = s % self.line_length
        i = int(np.searchsorted(self.line_s, s, side="right") - 1)
        j = (i + 1) % len(self.line)
        return self.line[i] + (s - self.line_s[i]) / self.line_seg[i] * (self.line[j] - self.line[i])

    def target(self, sim) -> tuple[float, float, float]:
        """(steer, target speed, current speed) for the car's current state."""
        track = _track(sim)
        if self._plan_for != track.id:
            self._plan(track)
        car = sim.car
        vel = np.array(car.hull.linearVelocity, np.float64)
        speed = float(np.hypot(*vel))
        tau = self.steer_delay / 50.0
        pos = np.array(car.hull.position, np.float64) + vel * tau
        a = car.hull.angle + car.hull.angularVelocity * tau
        i, _, _, s = track.project(pos)
        s_line = self.line_s[i] + (s - track.s[i]) / track.seg_len[i] * self.line_seg[i]
        d = self._line_point(s_line + self.lookahead + self.lookahead_per_speed * speed) - pos
        x_right = d @ np.array([math.cos(a), math.sin(a)])
        y_fwd = d @ np.array([-math.sin(a), math.cos(a)])
        if y_fwd < 0:                                         # goal behind (spun or facing backwards): full lock
            steer = math.copysign(1.0, x_right)
        else:
            curvature = 2.0 * x_right / max(x_right ** 2 + y_fwd ** 2, 1e-6)
            steer = math.atan(WHEELBASE * curvature) / MAX_WHEEL_ANGLE
        # Slowest profile speed over the distance covered before a brake decision takes effect.
        n = len(self.profile)
        ahead = int(speed * self.brake_delay / 50.0 / 3.5) + 1
        v_target = float(np.min(self.profile[[(i + j) % n for j in range(ahead + 1)]]))
        if y_fwd < 0 or not any(len(w.tiles) for w in car.wheels):
            v_target = min(v_target, self.offroad_speed)      # grass grips less; turning round needs it slow
        return steer, v_target, speed

    def act(self, frame, sim):
        steer, v_target, speed = self.target(sim)
        car = sim.car
        a = car.hull.angle
        v_fwd = float(np.array(car.hull.linearVelocity) @ np.array([-math.sin(a), math.cos(a)]))
        rear_spin = max(w.omega * w.wheel_rad for w in car.wheels[2:]) - v_fwd
        front_skid = v_fwd - min(w.omega * w.wheel_rad for w in car.wheels[:2])
        err = v_target - speed
        gas = float(np.clip(self.speed_gain * err, 0.0, 1.0)) if err > 0 and rear_spin < self.slip_max else 0.0
        brake = (float(np.clip(-self.brake_gain * err, 0.0, self.brake_max))
                 if err < -2.0 and front_skid < self.slip_max else 0.0)
        return np.array([np.clip(steer, -1, 1), gas, brake], np.float32), {}


# ---------------------------------------------------------------- action helpers
def colored_noise(beta: float, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^beta along the last axis, unit variance on average.

    beta = 0 is white noise; larger beta gives smoother, more persistent signals (beta = 2: random
    walk-like). Built in the frequency domain: random complex amplitudes scaled by f^(-beta/2).
    """
    n = shape[-1]
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0                             # no infinite power at f = 0
    scale = f ** (-beta / 2.0)
    spec = (rng.standard_normal((*shape[:-1], len(f))) + 1j * rng.standard_normal((*shape[:-1], len(f)))) * scale
    x = np.fft.irfft(spec, n=n, axis=-1)
    # One scale for the whole batch, and no per-series mean removal: the slow components (an offset
    # held over the whole horizon) are exactly what smooth noise is for.
    weight = np.full(len(f), 4.0)                             # 2 Re(X e^{i.}) has variance 4 ...
    weight[0] = 1.0                                           # ... DC and (even n) Nyquist keep only Re(X)
    if n % 2 == 0:
        weight[-1] = 1.0
    return x / (np.sqrt(np.sum(weight * scale ** 2)) / n)


def longitudinal_to_action(steer: np.ndarray, longitudinal: np.ndarray) -> np.ndarray:
    """(steer, one longitudinal axis in [-1,1]) -> [...,3] env actions: positive is gas, negative is brake,
    so no sample is wasted pressing both pedals at once."""
    lon = np.clip(longitudinal, -1.0, 1.0)
    return np.stack([np.clip(steer, -1.0, 1.0), np.maximum(lon, 0.0), np.maximum(-lon, 0.0)], -1).astype(np.float32)


# ---------------------------------------------------------------- episodes
def run_episode(env, policy, track_seed: int, k: int = CONTROL_PERIOD, max_steps: int | None = None,
                rng: np.random.Generator | None = None, on_frame=None) -> dict:
    """Drive one episode: reset on `track_seed`, skip the zoom-in, then one decision per k frames.

    Returns arrays with one row per control step: obs [T,64,64,3] uint8 (what the policy saw),
    action [T,3] (held for the next k frames), reward [T] (summed over those frames), done [T],
    the STATE_KEYS arrays at the moment of obs, expert_action [T,3] (what the expert would do at obs[t],
    whoever drives: the label that lets the prior learn from states the expert never visits itself),
    and any per-step extras the policy returned,
    plus `score` (the env's own episode return, zoom frames included), `lap_finished`, `tiles_fraction`.
    `on_frame(obs96, action, extras)` is called for every env frame (recording, rendering).
    Only policies with `privileged = True` (the expert) get the simulator; others see frames only.
    """
    obs, _ = env.reset(seed=int(track_seed))
    sim = env.unwrapped
    policy.reset(rng if rng is not None else np.random.default_rng(track_seed))
    score, done, lap, frames = 0.0, False, False, ZOOM_FRAMES
    for _ in range(ZOOM_FRAMES):
        obs, r, term, trunc, info = env.step(NOOP)
        score += r
    rows: dict[str, list] = {"obs": [], "action": [], "reward": [], "done": []}
    rows.update({key: [] for key in (*STATE_KEYS, "expert_action")})
    teacher = Expert()
    extras_rows: dict[str, list] = {}
    while not done and (max_steps is None or len(rows["obs"]) < max_steps):
        frame = to_model_frame(obs)
        state = sim_state(sim)
        label = teacher.act(frame, sim)[0]
        action, extras = policy.act(frame, sim if policy.privileged else None)
        action = np.asarray(action, np.float32)
        reward = 0.0
        for _ in range(k):
            obs, r, term, trunc, info = env.step(action)
            reward += r
            frames += 1
            if on_frame is not None:
                on_frame(obs, action, extras)
            if term or trunc:
                done, lap = True, bool(info.get("lap_finished", False))
                break
        score += reward
        rows["obs"].append(frame)
        rows["action"].append(action)
        rows["reward"].append(reward)
        rows["done"].append(done)
        for key in STATE_KEYS:
            rows[key].append(state[key])
        rows["expert_action"].append(label)
        for key, value in extras.items():
            extras_rows.setdefault(key, []).append(value)
    # The episode format's dtypes; `mistake` is the recovery collector's to add.
    out = {"obs": np.stack(rows["obs"]).astype(np.uint8)}
    out.update({name: np.array(rows[name], dtype) for name, (dtype, _) in COLUMNS.items() if name in rows})
    out.update({key: np.asarray(v) for key, v in extras_rows.items()})
    n_tiles = len(sim.track)
    out["score"] = float(score)
    out["lap_finished"] = lap
    out["tiles_fraction"] = float(sim.tile_visited_count / n_tiles)
    out["n_tiles"] = n_tiles
    out["env_frames"] = frames
    return out


def main() -> None:
    import argparse
    import time
    p = argparse.ArgumentParser(description="Quick expert check on a few tracks (tuning seeds: 500+).")
    p.add_argument("--seed", type=int, default=500)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--k", type=int, default=CONTROL_PERIOD)
    args = p.parse_args()
    env, expert, scores = make_env(), Expert(), []
    for s in range(args.seed, args.seed + args.episodes):
        t0 = time.time()
        ep = run_episode(env, expert, s, k=args.k)
        scores.append(ep["score"])
        print(f"seed {s}: score {ep['score']:.1f} tiles {ep['tiles_fraction']:.3f} lap {ep['lap_finished']} "
              f"steps {len(ep['obs'])} offroad {1 - ep['on_road'].mean():.3f} ({time.time() - t0:.1f}s)")
    print(f"mean {np.mean(scores):.1f} +- {np.std(scores):.1f}")


if __name__ == "__main__":
    main()
