"""Latent cache, predictor rollouts and the honesty of the copy-baseline metric."""
import json

import numpy as np
import pytest
import torch

from conftest import write_sources, write_synthetic
from data_loader import EpisodeData, LatentCache
from models import Predictor, TinyEncoder, load_checkpoint, save_checkpoint
from probes import LinearProbe
import train_predictor
from train_predictor import evaluate, latent_caches, leaving_recall


def tag_encode(frames):
    """A stand-in encoder: latent = (episode tag, row number, 0, 0) read from the synthetic pixels."""
    z = np.zeros((len(frames), 4), np.float32)
    z[:, 0] = frames[:, 0, 0, 0]
    z[:, 1] = frames[:, 0, 1, 0].astype(np.float32) + 256 * frames[:, 0, 2, 0].astype(np.float32)
    return z


@pytest.fixture
def sources(tmp_path):
    return write_sources(tmp_path, rows=25, tag_step=10)


def test_rollout_feeds_on_its_own_outputs():
    model = Predictor(latent=6, hidden=16, layers=1, history=1)
    calls = []
    model.net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].clone()))
    torch.nn.init.normal_(model.net[-1].weight)
    z = torch.randn(2, 2, 6)
    pred = model.rollout(z, torch.randn(2, 5, 3))
    assert len(calls) == 5 and pred.shape == (2, 5, 6)
    for h in range(1, 5):
        # the input at step h holds the prediction of step h-1 as its current state
        torch.testing.assert_close(calls[h][:, 6:12], pred[:, h - 1], rtol=1e-5, atol=1e-5)


def test_windows_stay_inside_episodes(sources):
    data = EpisodeData(sources, "all")
    cache = LatentCache(data, "tag", 4, tag_encode)
    for s in range(3):
        rows = cache.windows(s, horizon=15)
        assert len(rows) == 3 * (25 - 15)                                        # t = 0 .. 9 of each episode
        w = cache.gather(s, rows, horizon=15, history=1)
        assert w["z"].shape == (len(rows), 17, 4) and w["action"].shape == (len(rows), 15, 3)
        assert np.all(w["z"][:, :, 0] == w["z"][:, :1, 0])                       # one episode
        assert np.all(np.diff(w["z"][:, 1:, 1], axis=1) == 1)                    # consecutive steps from t on
        start = w["step"][:, 0] == 0
        assert start.sum() == 3 and np.all(w["z"][start, 0] == w["z"][start, 1])  # the first row stands in before
        assert np.all(np.diff(w["z"][~start, :2, 1], axis=1) == 1)
        np.testing.assert_array_equal(w["speed"], w["z"][:, 1:, 1])              # columns from t on


def test_latent_cache_is_keyed_by_checkpoint_content(sources, tmp_path):
    enc_path = tmp_path / "enc.pth"
    save_checkpoint(enc_path, "encoder", TinyEncoder(width=8, latent=16))
    tr1, _, _ = latent_caches(enc_path, sources, 0.34, 0, "cpu")
    save_checkpoint(enc_path, "encoder", TinyEncoder(width=8, latent=16))      # same path, new weights
    tr2, _, _ = latent_caches(enc_path, sources, 0.34, 0, "cpu")
    assert tr1.key != tr2.key
    assert not np.allclose(np.asarray(tr1.latents[0]), np.asarray(tr2.latents[0]))
    files = sorted(p.name for p in (tmp_path / "race" / ".cache").glob("latents_*"))
    assert files == sorted([f"latents_{tr1.key}.f32", f"latents_{tr2.key}.f32"])


def test_latent_cache_encodes_only_new_rows(sources, tmp_path):
    seen = []
    encode = lambda f: (seen.append(len(f)), tag_encode(f))[1]
    LatentCache(EpisodeData(sources, "all"), "k", 4, encode)
    assert sum(seen) == 3 * 3 * 25
    write_synthetic(sources["race"], 1, 25, tag0=90, prefix="s1_ep")
    seen.clear()
    cache = LatentCache(EpisodeData(sources, "all"), "k", 4, encode)
    assert sum(seen) == 25 and cache.latents[0][-1, 0] == 90


def test_a_predictor_that_returns_its_input_scores_exactly_one(sources):
    cache = LatentCache(EpisodeData(sources, "all"), "tag", 4, tag_encode)
    model = Predictor(latent=4, hidden=8, layers=1, history=1)   # last layer starts at zero: z_{t+1} = z_t
    result = evaluate(model, cache, horizon=5, history=1, device="cpu")
    for name in ("race", "recovery", "random"):
        assert result[name]["ratio@1"] == 1.0 and result[name]["ratio@5"] == 1.0


def test_leaving_recall_counts_only_windows_that_leave_the_road():
    # latent dim 0 holds "on the road" (+1) or "off" (-1); the probe reads it
    z = torch.tensor([[1.0], [-1.0]]).repeat(50, 1) + 0.01 * torch.randn(100, 1)
    probe = LinearProbe("logistic").fit(z, (z[:, 0] > 0).double())
    # windows 0-9 leave the road by step 3 (one of them only at step 2), 10-19 stay on, 20-29 start off
    on_road = torch.ones(30, 4)
    on_road[:10, 3] = 0
    on_road[0, 2:] = 0
    on_road[20:] = 0
    true = torch.where(on_road[:, 3:4] > 0, 1.0, -1.0)                       # [30,1] the truth at step 3
    blind = torch.ones(30, 1)                                                 # a dream that never leaves
    seeing = true.clone()
    seeing[:4] = 1.0                                                          # sees 6 of the 10 leave
    r = leaving_recall(probe, blind, true, on_road, 3)
    assert r == {"leaving_road_recall@3_predicted": 0.0, "leaving_road_recall@3_true_latent": 1.0,
                 "leaving_road_windows@3": 10}
    assert leaving_recall(probe, seeing, true, on_road, 3)["leaving_road_recall@3_predicted"] == 0.6
    assert leaving_recall(probe, blind, true, torch.ones(30, 4), 3) == {}      # nobody leaves: no figure


def test_train_predictor_runs_end_to_end_and_writes_its_outputs(sources, tmp_path):
    enc = tmp_path / "enc.pth"
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    args = train_predictor.parser().parse_args(
        ["--preset", "tiny", "--device", "cpu", "--encoder", str(enc), "--out-dir", str(tmp_path / "m"),
         "--race-dir", sources["race"], "--recovery-dir", sources["recovery"], "--random-dir", sources["random"],
         "--val-frac", "0.34", "--horizon", "5", "--epochs", "3", "--batches-per-epoch", "40", "--hidden", "64"])
    train_predictor.main(args)
    stats = [l for l in (tmp_path / "m" / "predictor_stats.jsonl").read_text().splitlines()]
    assert len(stats) == 3 and (tmp_path / "m" / "predictor_horizon.png").exists()
    assert (tmp_path / "m" / "predictor_final.pth").exists() and (tmp_path / "m" / "predictor_probes.json").exists()
    probes = json.loads((tmp_path / "m" / "predictor_probes.json").read_text())
    assert set(probes["leaving_road_by_source"]) <= {"race", "recovery", "random"}
    assert load_checkpoint(tmp_path / "m" / "predictor_final.pth", "predictor")["probes"] == probes


def test_init_warm_starts_from_a_predictor_and_onpolicy_dirs_add_sources(sources, tmp_path):
    enc = tmp_path / "enc.pth"
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    extra = tmp_path / "mine"
    write_synthetic(extra, 3, 25, tag0=70)
    base = ["--preset", "tiny", "--device", "cpu", "--encoder", str(enc), "--race-dir", sources["race"],
            "--recovery-dir", sources["recovery"], "--random-dir", sources["random"], "--val-frac", "0.34",
            "--horizon", "5", "--hidden", "32"]
    train_predictor.main(train_predictor.parser().parse_args(base + ["--out-dir", str(tmp_path / "a"),
                                                                     "--epochs", "2", "--batches-per-epoch", "20"]))
    first = load_checkpoint(tmp_path / "a" / "predictor_final.pth", "predictor")
    # zero steps of training after --init: the weights and the normalisation are exactly the first model's
    train_predictor.main(train_predictor.parser().parse_args(
        base + ["--out-dir", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "predictor_final.pth"),
                "--onpolicy-dirs", str(extra), "--epochs", "1", "--batches-per-epoch", "1", "--lr", "0"]))
    second = load_checkpoint(tmp_path / "b" / "predictor_final.pth", "predictor")
    for k, v in first["model"].items():
        torch.testing.assert_close(second["model"][k], v)
    assert list((extra / ".cache").glob("latents_*.f32"))            # the on-policy folder was read as a source
    # a predictor of another encoder is refused
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    with pytest.raises(SystemExit, match="another encoder"):
        train_predictor.main(train_predictor.parser().parse_args(
            base + ["--out-dir", str(tmp_path / "c"), "--init", str(tmp_path / "a" / "predictor_final.pth")]))
