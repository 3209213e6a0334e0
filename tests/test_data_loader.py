"""Episode files, the frame cache, splits and balanced batches (no simulator needed)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, synthetic_episode, write_synthetic
from data_loader import (COLUMNS, EPISODE_VERSION, BalancedBatches, EpisodeData, EpisodeError, LatentCache,
                         SourceCache, batch_counts, is_validation, read_episode, write_episode)
from presets import atomic_write


def test_episode_round_trip(tmp_path):
    ep = synthetic_episode(12, tag=7)
    write_episode(tmp_path / "a.npz", ep, {"k": 4, "source": "x"})
    arrays, meta = read_episode(tmp_path / "a.npz")
    assert meta["k"] == 4 and meta["format_version"] == EPISODE_VERSION == 2
    for key in ep:
        np.testing.assert_array_equal(arrays[key], ep[key])


def test_episodes_without_injected_mistakes_are_written_with_zeros(tmp_path):
    ep = synthetic_episode(9, tag=2)
    del ep["mistake"]
    write_episode(tmp_path / "a.npz", ep, {})
    arrays, _ = read_episode(tmp_path / "a.npz")
    assert arrays["mistake"].dtype == np.int8 and arrays["mistake"].shape == (9,) and not arrays["mistake"].any()
    np.testing.assert_array_equal(arrays["obs"], ep["obs"])


def test_format_1_files_read_with_no_expert_label(tmp_path):
    ep = synthetic_episode(6, tag=3)
    payload = {"obs": ep["obs"], **{n: ep[n] for n in COLUMNS if n != "expert_action"}}
    np.savez_compressed(tmp_path / "old.npz", meta=np.array(json.dumps({"format_version": 1, "k": 4})), **payload)
    arrays, _ = read_episode(tmp_path / "old.npz")
    assert arrays["expert_action"].shape == (6, 3) and np.isnan(arrays["expert_action"]).all()
    np.testing.assert_array_equal(arrays["action"], ep["action"])
    np.savez_compressed(tmp_path / "new.npz", meta=np.array(json.dumps({"format_version": 2, "k": 4})), **payload)
    with pytest.raises(EpisodeError, match="expert_action"):                    # format 2 must carry it
        read_episode(tmp_path / "new.npz")


def test_write_rejects_wrong_shape_and_dtype(tmp_path):
    ep = synthetic_episode(5, tag=1)
    ep["action"] = ep["action"].astype(np.float64)
    with pytest.raises(EpisodeError, match="action"):
        write_episode(tmp_path / "b.npz", ep, {})
    assert not (tmp_path / "b.npz").exists()


def test_killed_write_leaves_no_partial_file(tmp_path):
    def write_half_then_die(f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt("killed")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "ep.npz", write_half_then_die)
    assert os.listdir(tmp_path) == []


def test_hard_killed_writer_leaves_only_a_hidden_temp_file(tmp_path):
    # SIGKILL while writing: no cleanup runs, but the target name never exists half-written,
    # and the loader ignores the temp file.
    code = textwrap.dedent(f"""
        import os, sys; sys.path.insert(0, {str(ROOT)!r})
        from presets import atomic_write
        def w(f):
            f.write(b"x" * 1000); f.flush(); os.kill(os.getpid(), 9)
        atomic_write({str(tmp_path / 's0_ep000000_T5.npz')!r}, w)
    """)
    subprocess.run([sys.executable, "-c", code])
    names = os.listdir(tmp_path)
    assert "s0_ep000000_T5.npz" not in names and len(names) == 1 and names[0].endswith(".tmp")
    write_synthetic(tmp_path, 1, 5, prefix="s0_ep9")
    assert SourceCache(tmp_path).rows == 5


def test_corrupt_and_wrong_files_are_skipped_with_warning_and_counted(tmp_path):
    write_synthetic(tmp_path, 2, 10)
    good = (tmp_path / "s0_ep000000_T10.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    bad = synthetic_episode(10, 3)
    np.savez(tmp_path / "wrongdtype.npz", meta=np.array("{}"), **{**bad, "obs": bad["obs"].astype(np.float32)})
    with pytest.warns(UserWarning) as record:
        cache = SourceCache(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "truncated.npz" in messages and "wrongdtype.npz" in messages and "uint8" in messages
    assert cache.rows == 20 and cache.bad == ["truncated.npz", "wrongdtype.npz"]
    with pytest.raises(EpisodeError, match="truncated.npz"):
        read_episode(tmp_path / "truncated.npz")


def test_strict_mode_raises_on_bad_file(tmp_path):
    write_synthetic(tmp_path, 1, 10)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(EpisodeError, match="broken.npz"):
        SourceCache(tmp_path, strict=True)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*collector"):
        SourceCache(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no usable episode"):
        SourceCache(tmp_path / "empty")


def test_cache_is_extended_not_rebuilt_when_episodes_appear(tmp_path):
    write_synthetic(tmp_path, 2, 10)
    SourceCache(tmp_path)
    before = (tmp_path / ".cache" / "obs.bin").stat().st_ino
    write_synthetic(tmp_path, 1, 7, tag0=50, prefix="s1_ep")
    cache = SourceCache(tmp_path)
    assert cache.rows == 27 and (tmp_path / ".cache" / "obs.bin").stat().st_ino == before
    last = cache.frames(np.array([26]))
    assert last[0, 0, 0, 0] == 50 and last[0, 0, 1, 0] == 6


def test_cache_rebuilds_when_an_episode_changes(tmp_path):
    write_synthetic(tmp_path, 2, 10)
    SourceCache(tmp_path)
    write_synthetic(tmp_path, 1, 10, tag0=9)          # same name, new content
    cache = SourceCache(tmp_path)
    tags = {int(cache.frames(np.array([r]))[0, 0, 0, 0]) for r in range(cache.rows)}
    assert tags == {9, 1}


def test_split_is_by_episode_seeded_and_stable_when_episodes_are_added():
    names = [f"s0_ep{i:06d}_T100.npz" for i in range(400)]
    val = {n for n in names if is_validation(n, 0.1, seed=0)}
    assert 20 < len(val) < 60
    more = names + [f"s1_ep{i:06d}_T100.npz" for i in range(400)]
    assert {n for n in more[:400] if is_validation(n, 0.1, seed=0)} == val
    assert {n for n in names if is_validation(n, 0.1, seed=1)} != val


def test_train_and_val_never_share_an_episode(three_sources):
    train = EpisodeData(three_sources, "train", val_frac=0.3)
    val = EpisodeData(three_sources, "val", val_frac=0.3)
    for s in range(3):
        tr, va = set(train.episode_ids[s]), set(val.episode_ids[s])
        assert tr and va and not tr & va
        assert len(tr | va) == len(train.caches[s].episodes)


@pytest.mark.parametrize("kind", ["frames", "windows"])
def test_balanced_batches_hold_their_shares(three_sources, kind):
    data = EpisodeData(three_sources, "all")
    batches = BalancedBatches(data, batch_size=31, kind=kind, horizon=5, seed=3, batches_per_epoch=40)
    for batch in batches.epoch(0):
        counts = np.bincount(batch["source"], minlength=3)
        assert np.all(np.abs(counts - 31 / 3) <= 1), counts
        tags = batch["obs"][:, 0, 0, 0, 0] if kind == "windows" else batch["obs"][:, 0, 0, 0]
        np.testing.assert_array_equal(tags // 100, batch["source"])       # the frames really are that source's


def test_custom_shares(three_sources):
    data = EpisodeData(three_sources, "all")
    batches = BalancedBatches(data, 100, shares={"race": 0.5, "recovery": 0.25, "random": 0.25}, batches_per_epoch=5)
    for batch in batches.epoch(0):
        assert list(np.bincount(batch["source"], minlength=3)) == [50, 25, 25]


def test_batch_counts_are_within_one_of_the_share():
    rng = np.random.default_rng(0)
    shares = np.array([0.2, 0.3, 0.5])
    for b in [1, 7, 64, 257]:
        c = batch_counts(b, shares, rng)
        assert c.sum() == b and np.all(np.abs(c - shares * b) < 1)


def test_windows_never_cross_episodes_and_are_consecutive(three_sources):
    data = EpisodeData(three_sources, "all")
    h = 15
    batches = BalancedBatches(data, batch_size=60, kind="windows", horizon=h, seed=1, batches_per_epoch=30)
    for batch in batches.epoch(0):
        assert batch["obs"].shape == (60, h + 1, 64, 64, 3) and batch["action"].shape == (60, h, 3)
        tag = batch["obs"][:, :, 0, 0, 0]
        t = batch["obs"][:, :, 0, 1, 0].astype(int) + 256 * batch["obs"][:, :, 0, 2, 0].astype(int)
        assert np.all(tag == tag[:, :1])                                   # one episode per window
        assert np.all(np.diff(t, axis=1) == 1)                             # consecutive rows
        np.testing.assert_array_equal(batch["speed"], t)                   # columns line up with frames
    # 30-row episodes give exactly 30 - 15 windows each
    assert len(data.window_starts(0, h)) == 2 * 15


def test_start_windows_and_steps_count_from_each_episodes_first_row(three_sources):
    """windows(first=N) keeps each episode's first N windows: the drives' starts, whatever the source's size."""
    data = EpisodeData(three_sources, "all")
    # latent = (tag, t): which episode a row belongs to and where in it
    cache = LatentCache(data, "k", 2, lambda f: np.stack([f[:, 0, 0, 0], f[:, 0, 1, 0]], 1).astype(np.float32))
    for s, episodes in enumerate([2, 6, 12]):
        z = cache.latents[s][cache.windows(s, horizon=15, first=4)]
        assert len(z) == episodes * 4 and len(np.unique(z[:, 0])) == episodes
        np.testing.assert_array_equal(z[:, 1], np.tile([0, 1, 2, 3], episodes))   # t = 0 .. 3: from the first row
        rows = cache.windows(s, horizon=15)
        steps = cache.gather(s, rows, horizon=15, history=1)["step"]            # [N,16]: t .. t+15 in its episode
        np.testing.assert_array_equal(steps, cache.latents[s][rows][:, 1:2] + np.arange(16))
        # a start longer than the episode's windows is all of them
        np.testing.assert_array_equal(cache.windows(s, 15, first=100), cache.windows(s, 15))
        # a sample: distinct windows in row order, as many as asked for, or all of them where there are fewer
        picked = cache.sample_windows(s, 15, 7, np.random.default_rng(0))
        assert len(picked) == min(7, len(rows)) and np.all(np.diff(picked) > 0) and np.isin(picked, rows).all()
        np.testing.assert_array_equal(cache.sample_windows(s, 15, len(rows) + 5, np.random.default_rng(0)), rows)


def test_history_before_an_episodes_first_row_repeats_that_row(three_sources):
    """As the planner's first decision sees it (test_mpc: "the first frame stands in"): [z0, z0, z0, z1 ..]."""
    cache = LatentCache(EpisodeData(three_sources, "all"), "k", 2,
                        lambda f: np.stack([f[:, 0, 0, 0], f[:, 0, 1, 0]], 1).astype(np.float32))
    for s in range(3):
        rows = cache.windows(s, horizon=3)
        w = cache.gather(s, rows, horizon=3, history=2)                   # z [N,6,2]: t-2 .. t+3
        t, z = w["step"][:, 0], w["z"]
        assert np.all(z[:, :, 0] == z[:, :1, 0])                         # never across episodes
        np.testing.assert_array_equal(z[:, :, 1], np.maximum(t[:, None] + np.arange(-2, 4), 0))
        assert set(t[:3].tolist()) == {0, 1, 2} and (t == 0).sum() == len(np.unique(z[:, 0, 0]))


def test_epoch_is_reproducible_and_rank_dependent(three_sources):
    data = EpisodeData(three_sources, "all")
    a = [b["speed"] for b in BalancedBatches(data, 16, seed=5, batches_per_epoch=3).epoch(2)]
    b = [b["speed"] for b in BalancedBatches(data, 16, seed=5, batches_per_epoch=3).epoch(2)]
    c = [b["speed"] for b in BalancedBatches(data, 16, seed=5, batches_per_epoch=3, rank=1).epoch(2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_mixed_control_periods_are_refused(tmp_path):
    write_synthetic(tmp_path / "a", 2, 10, k=4)
    write_synthetic(tmp_path / "b", 2, 10, k=2)
    with pytest.raises(EpisodeError, match="control period"):
        EpisodeData({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})


def test_peak_memory_stays_bounded_on_a_dataset_larger_than_the_budget(tmp_path):
    """Build a 234 MB frame cache and read all of it through the loader: RSS grows < 64 MB (the budget).

    Batches are the only thing the loader holds (frames: 256 x 12 KB = 3 MB; windows: 64 x 16 frames
    = 12.6 MB), so the budget is independent of the dataset size; np.load-ing episodes or touching
    every page of an mmap would grow RSS with the data."""
    code = textwrap.dedent(f"""
        import resource, sys, json
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        import numpy as np
        from conftest import write_synthetic
        from data_loader import EpisodeData, BalancedBatches
        folder = {str(tmp_path / 'big')!r}
        write_synthetic(folder, 20, 1000)                      # 20,000 frames = 246 MB of pixels
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data = EpisodeData({{"big": folder}}, "all")
        seen = 0
        for kind in ("frames", "windows"):
            for batch in BalancedBatches(data, 256 if kind == "frames" else 64, kind=kind, horizon=15).epoch(0):
                seen += batch["obs"].shape[0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grow_mb": (peak - base) / 1024, "seen": seen}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size_mb = (tmp_path / "big" / ".cache" / "obs.bin").stat().st_size / 2 ** 20
    assert size_mb > 230 and r["seen"] > 19000
    assert r["grow_mb"] < 64, f"RSS grew {r['grow_mb']:.0f} MB while reading a {size_mb:.0f} MB dataset"
