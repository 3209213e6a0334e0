"""Shared test helpers: synthetic episodes whose pixels say where they came from."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
# One thread per process: the tests run several processes on 2 cores, where competing OpenMP thread
# pools were measured 4-70x slower than single-threaded ones. Subprocesses of the tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from data_loader import COLUMNS, write_episode  # noqa: E402


def synthetic_episode(rows: int, tag: int, rng=None) -> dict:
    """An episode of `rows` rows. obs[t] pixel (0,0) = tag, pixel (0,1) = t % 256, (0,2) = t // 256."""
    rng = rng or np.random.default_rng(tag)
    obs = np.zeros((rows, 64, 64, 3), np.uint8)
    obs[:, 0, 0, 0] = tag
    obs[:, 0, 1, 0] = np.arange(rows) % 256
    obs[:, 0, 2, 0] = np.arange(rows) // 256
    ep = {"obs": obs}
    for name, (dtype, tail) in COLUMNS.items():
        ep[name] = np.zeros((rows, *tail), dtype)
    ep["action"][:] = rng.uniform(-1, 1, (rows, 3))
    ep["speed"][:] = np.arange(rows)
    ep["done"][-1] = True
    return ep


def write_synthetic(folder, n_episodes: int, rows: int, tag0: int = 0, k: int = 4, prefix: str = "s0_ep") -> list:
    folder = Path(folder)
    paths = []
    for i in range(n_episodes):
        p = folder / f"{prefix}{i:06d}_T{rows}.npz"
        write_episode(p, synthetic_episode(rows, tag0 + i), {"source": "synthetic", "k": k, "score": 0.0,
                                                             "lap_finished": False, "tiles_fraction": 0.0})
        paths.append(p)
    return paths


def write_sources(root, episodes: int = 3, rows: int = 30, tag_step: int = 60) -> dict:
    """race / recovery / random folders of synthetic episodes; source j's tags start at j * tag_step."""
    dirs = {}
    for j, name in enumerate(["race", "recovery", "random"]):
        dirs[name] = str(Path(root) / name)
        write_synthetic(dirs[name], episodes, rows, tag0=tag_step * j)
    return dirs


@pytest.fixture
def three_sources(tmp_path):
    """Sources of very different sizes: 2, 6 and 12 episodes of 30 rows, tags 0.., 100.., 200.."""
    dirs = {}
    for j, (name, n) in enumerate([("race", 2), ("recovery", 6), ("random", 12)]):
        dirs[name] = str(tmp_path / name)
        write_synthetic(dirs[name], n, 30, tag0=100 * j)
    return dirs
