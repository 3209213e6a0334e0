"""The simulator side: frames, privileged state, the three policies, the collection runner, evaluation.

These drive the real CarRacing-v3 for a few hundred frames each, so they take seconds, not minutes.
"""
import json
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import pygame

from carenv import Expert, colored_noise, longitudinal_to_action, make_env, run_episode, sim_state, to_model_frame
from collect_data import RandomExplorer
from collect_recovery_data import MistakeExpert
from collection import run_collection, track_seed
from conftest import ROOT
from data_loader import finished_episodes, read_episode
from presets import EVAL_SEED_LIMIT

TUNE_SEED = 500            # tests use the expert's tuning tracks, never evaluation ones


@pytest.fixture(scope="module")
def env():
    e = make_env()
    yield e
    e.close()


def test_frame_is_area_resampled():
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    frame = to_model_frame(obs)
    # 96 -> 64 is 2x up then 3x3 box down: the exact area average
    ref = np.repeat(np.repeat(obs.astype(float), 2, 0), 2, 1).reshape(64, 3, 64, 3, 3).mean((1, 3))
    assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    assert np.abs(frame.astype(float) - ref).max() <= 0.5


def test_expert_drives_along_the_track(env):
    ep = run_episode(env, Expert(), TUNE_SEED, max_steps=100)                     # 400 frames, 8 s
    assert ep["obs"].shape == (100, 64, 64, 3)
    assert ep["tiles"][-1] >= 0.2 * ep["n_tiles"], ep["tiles"][-1]                # a fifth of the lap in 8 s
    assert ep["on_road"].mean() > 0.97 and ep["speed"].max() > 40
    # the racing line cuts corners: the car's centre stays within the road plus half a car width
    assert np.abs(ep["lateral"]).max() < 40 / 6 + 1.2
    np.testing.assert_array_equal(ep["expert_action"], ep["action"])              # its own label: what it did


def test_privileged_state_at_the_start(env):
    env.reset(seed=TUNE_SEED)
    s = sim_state(env.unwrapped)
    assert s["on_road"] and abs(s["lateral"]) < 0.5 and abs(s["heading_err"]) < 0.1 and s["speed"] < 1


def test_recovery_episodes_hold_mistakes_and_recoveries(tmp_path):
    args = Namespace(preset="tiny", out_dir=str(tmp_path), workers=1, seed=0, episodes=1, frames=None, max_steps=200)
    summary = run_collection("recovery", MistakeExpert, args, {"gap_s": 1.5})
    arrays, meta = read_episode(next(tmp_path.glob("*.npz")))
    kinds = set(np.unique(arrays["mistake"])) - {0}
    assert len(kinds) >= 2 and meta["source"] == "recovery"
    assert summary["mistakes"] >= 3 and summary["recovered_within_3s"] > 0
    on_after = [arrays["on_road"][i:i + 38].any() for i in np.flatnonzero(np.diff(arrays["mistake"]) < 0) + 1]
    assert any(on_after)


def test_random_exploration_moves_and_leaves_the_road(env):
    ep = run_episode(env, RandomExplorer(), TUNE_SEED, max_steps=200, rng=np.random.default_rng(1))
    assert np.median(ep["speed"]) > 10                                            # not parked
    assert (~ep["on_road"]).mean() > 0.2                                          # off the road a good while
    assert np.ptp(ep["action"][:, 0]) > 1.0 and np.abs(np.diff(ep["action"][:, 0])).mean() < 0.3   # smooth, wide
    # Every step carries what the expert would have done there: a valid action, not what the explorer did.
    label = ep["expert_action"]
    assert label.shape == (200, 3) and np.isfinite(label).all()
    assert (np.abs(label[:, 0]) <= 1).all() and (label[:, 1:] >= 0).all() and (label[:, 1:] <= 1).all()
    assert np.abs(label[:, 0] - ep["action"][:, 0]).mean() > 0.2


def test_collection_resumes_and_seeds_are_reproducible(tmp_path):
    args = Namespace(preset="tiny", out_dir=str(tmp_path), workers=2, seed=3, episodes=2, frames=None, max_steps=10)
    s1 = run_collection("random", RandomExplorer, args)
    assert s1["run"]["new_episodes"] == 2 and sorted(finished_episodes(tmp_path, 3)) == [0, 1]
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    args.episodes = 3
    s2 = run_collection("random", RandomExplorer, args)
    assert s2["run"]["new_episodes"] == 1 and s2["episodes"] == 3
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in tmp_path.glob("*.npz") if p.name in mtimes)
    metas = [read_episode(p)[1] for p in sorted(tmp_path.glob("*.npz"))]
    assert [m["track_seed"] for m in metas] == [track_seed("random", 3, i) for i in range(3)]
    assert all(m["track_seed"] >= EVAL_SEED_LIMIT and m["k"] == 4 for m in metas)
    assert {m["versions"]["pygame"] for m in metas} == {pygame.version.ver}      # pygame draws the frames


class FailingExplorer(RandomExplorer):
    """Crashes on the episodes whose policy RNG draws below 0.5 (decided by seed and index)."""

    def reset(self, rng):
        if rng.random() < 0.5:
            raise RuntimeError("boom")
        super().reset(rng)


def test_a_crashing_episode_reports_its_track_seed_and_the_rest_go_on(tmp_path, capsys):
    fails = [i for i in range(4) if np.random.default_rng([0, 2, i]).random() < 0.5]
    assert 0 < len(fails) < 4
    args = Namespace(preset="tiny", out_dir=str(tmp_path), workers=2, seed=0, episodes=4, frames=None, max_steps=5)
    summary = run_collection("random", FailingExplorer, args)
    assert sorted(summary["run"]["failed_track_seeds"]) == sorted(track_seed("random", 0, i) for i in fails)
    assert summary["episodes"] == 4 - len(fails)
    printed = "".join(capsys.readouterr())
    assert all(str(track_seed("random", 0, i)) in printed for i in fails) and "boom" in printed


def test_frame_target_stops_collection(tmp_path):
    args = Namespace(preset="tiny", out_dir=str(tmp_path), workers=1, seed=0, episodes=None, frames=25, max_steps=10)
    summary = run_collection("race", Expert, args)
    assert summary["frames"] == 30 and summary["episodes"] == 3


def test_colored_noise_has_the_requested_slope_and_actions_respect_bounds():
    rng = np.random.default_rng(0)
    for beta in (0.0, 1.0, 2.0):
        x = colored_noise(beta, (400, 256), rng)
        power = (np.abs(np.fft.rfft(x, axis=-1)) ** 2).mean(0)[1:]
        f = np.fft.rfftfreq(256)[1:]
        slope = np.polyfit(np.log(f), np.log(power), 1)[0]
        assert abs(slope + beta) < 0.15, (beta, slope)
    a = longitudinal_to_action(3 * rng.standard_normal(1000), 3 * rng.standard_normal(1000))
    assert a.min() >= -1 and a[:, 1:].min() >= 0 and a.max() <= 1
    assert not np.any((a[:, 1] > 0) & (a[:, 2] > 0))                               # never both pedals


def test_drive_mpc_expert_writes_the_json_report_and_the_drives(tmp_path):
    out, drives = tmp_path / "r.json", tmp_path / "drives"
    r = subprocess.run([sys.executable, str(ROOT / "drive_mpc.py"), "--policy", "expert", "--episodes", "2",
                        "--seed", "500", "--max-steps", "15", "--json", str(out), "--save-episodes", str(drives)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["seeds"] == [500, 501] and len(report["scores"]) == 2
    assert {"scores", "mean", "std", "tiles_fraction", "lap_finished"} <= set(report)
    assert report["mean"] == pytest.approx(np.mean(report["scores"]), abs=0.01)
    assert "mean" in r.stdout and "500..501" in r.stdout
    # --save-episodes: each drive in the episode format, named by its track seed, with what it scored
    saved = sorted(drives.glob("*.npz"))
    assert [finished_episodes(drives, s) for s in (500, 501)] == [{0: 15}, {0: 15}]
    for path, seed, score in zip(saved, (500, 501), report["scores"]):
        arrays, meta = read_episode(path)
        assert meta["track_seed"] == seed and meta["source"] == "evaluation" and meta["policy"] == "expert"
        assert meta["score"] == pytest.approx(score, abs=0.01)
        np.testing.assert_allclose(arrays["expert_action"], arrays["action"])     # the expert drove: its own labels
        assert arrays["tiles"][-1] > arrays["tiles"][0]
