"""The judge: its metrics are honest, and it trains on true and on dreamt transitions."""
import json

import numpy as np
import pytest
import torch

from conftest import write_sources
from data_loader import EpisodeData, LatentCache
from models import Predictor, TinyEncoder, load_checkpoint, save_checkpoint
import train_cost_model
from probes import roc_auc
from train_cost_model import calibration, predicted_transitions
from train_predictor import file_hash


def test_roc_auc_is_the_ranking_probability():
    y = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == 0.5                # ties count half
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9], requires_grad=True), y) == 1.0   # a judge's raw output
    g = torch.Generator().manual_seed(0)
    assert abs(roc_auc(torch.rand(4000, generator=g), torch.rand(4000, generator=g) > 0.5) - 0.5) < 0.03


def test_calibration_error_is_zero_when_calibrated_and_large_when_not():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(20000, generator=g)
    label = torch.rand(20000, generator=g) < p
    assert calibration(p, label)["ece"] < 0.02
    assert calibration(torch.full((1000,), 0.95), torch.zeros(1000))["ece"] == pytest.approx(0.95)


def test_dreamt_transitions_line_up_with_what_really_happened(tmp_path):
    dirs = write_sources(tmp_path, rows=25, tag_step=10)
    dirs["onpolicy1"] = dirs["recovery"]                               # the MPC's drives: a fourth source
    cache = LatentCache(EpisodeData(dirs, "all"), "k", 4, lambda f: np.zeros((len(f), 4), np.float32))
    t = predicted_transitions(cache, Predictor(4, 8, 1, 1), per_source=5, recovery_label="exclude",
                              device="cpu", seed=0, h=6, onpolicy_label="negative")
    n = 4 * 5 * 6                                                       # sources x windows x steps
    assert t["z0"].shape == (n, 4) and t["z1"].shape == (n, 4) and len(t["road"]) == n
    assert set(t["expert"][t["source"] == 0].tolist()) == {1.0} and not t["use_expert"][t["source"] == 1].any()
    own = t["source"] == 3
    assert t["use_expert"][own].all() and set(t["expert"][own].tolist()) == {0.0}
    # start dreams: every window that begins in an episode's first 2 steps (3 episodes per source here)
    # latent [B,4] = (t, 0, 0, 0)
    step = lambda f: np.pad(f[:, 0, 1:2, 0], ((0, 0), (0, 3))).astype(np.float32)   # noqa: E731
    cache = LatentCache(EpisodeData(dirs, "all"), "t", 4, step)
    s = predicted_transitions(cache, Predictor(4, 8, 1, 1), per_source=0, recovery_label="exclude", device="cpu",
                              seed=0, h=6, onpolicy_label="negative", first=2)
    assert len(s["z0"]) == 4 * 3 * 2 * 6                               # sources x episodes x windows x steps
    np.testing.assert_array_equal(s["z0"][::6, 0], np.tile([0, 1], 4 * 3))   # each dream starts at t = 0 or 1
    true = train_cost_model.transitions(cache, "exclude", "negative")
    own = true["source"] == 3
    assert own.any() and true["use_expert"][own].all() and set(true["expert"][own].tolist()) == {0.0}


def test_train_cost_model_end_to_end_records_what_it_learned_from(tmp_path):
    dirs = write_sources(tmp_path, rows=30)
    enc = tmp_path / "encoder_final.pth"
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    pred = tmp_path / "predictor_final.pth"
    save_checkpoint(pred, "predictor", Predictor(16, 16, 1, 1), encoder_hash=file_hash(enc), horizon=5)
    args = train_cost_model.parser().parse_args(
        ["--preset", "tiny", "--device", "cpu", "--encoder", str(enc), "--predictor", str(pred), "--out-dir",
         str(tmp_path), "--val-frac", "0.34", "--on-predictions", "10", "--start-dreams", "3", "--start-weight", "2",
         *[x for s, d in dirs.items() for x in (f"--{s}-dir", d)]])
    train_cost_model.main(args)
    ckpt = load_checkpoint(tmp_path / "cost_model_final.pth", "cost")
    assert ckpt["encoder_hash"] == file_hash(enc) and ckpt["predictor_hash"] == file_hash(pred)
    stats = json.loads((tmp_path / "cost_model_stats.json").read_text())
    assert {"expert_auc", "road_accuracy", "progress_r2", "expert_calibration"} <= set(stats["val"])
    assert stats["val_on_predictions"] is not None and stats["val_on_starts"] is not None
    # 2 of 3 episodes per source train: 3 sources x 2 x 3 start windows x 5 steps, counted once, trained on twice
    true, dreamt = 3 * 2 * 29, 3 * min(10, 2 * (30 - 5 - 1)) * 5
    assert stats["start_transitions"] == 3 * 2 * 3 * 5
    assert stats["train_transitions"] == true + dreamt + 2 * stats["start_transitions"]


def test_onpolicy_sources_are_named_in_order_and_labelled_as_asked():
    from presets import data_dirs
    from argparse import Namespace
    dirs = data_dirs(Namespace(race_dir="r", recovery_dir="c", random_dir="d", onpolicy_dirs=["x", "y"]))
    assert dirs == {"race": "r", "recovery": "c", "random": "d", "onpolicy1": "x", "onpolicy2": "y"}
    assert train_cost_model.mixed("onpolicy2") and train_cost_model.mixed("recovery")
    assert not train_cost_model.mixed("random") and not train_cost_model.mixed("race")
    road, step = np.array([True, False, True]), np.array([0, 1, 2])
    def labels(name, rec, own, start=0):
        return [a.tolist() for a in train_cost_model.expert_labels(name, road, rec, own, step, start)]
    assert labels("race", "exclude", "negative") == [[1, 1, 1], [True] * 3]
    assert labels("random", "on_road", "negative") == [[0, 0, 0], [True] * 3]
    assert labels("recovery", "exclude", "negative") == [[0, 0, 0], [False] * 3]        # left out
    assert labels("recovery", "on_road", "negative") == [[1, 0, 1], [True] * 3]
    # The planner's own drives: not expert (adversarial imitation), or treated like recovery.
    assert labels("onpolicy1", "exclude", "negative") == [[0, 0, 0], [True] * 3]
    assert labels("onpolicy1", "exclude", "negative", start=2) == [[0, 0, 0], [False, False, True]]   # its start
    assert labels("race", "exclude", "negative", start=2) == [[1, 1, 1], [True] * 3]           # only its own drives
    assert labels("onpolicy2", "on_road", "negative") == [[0, 0, 0], [True] * 3]
    assert labels("onpolicy1", "exclude", "exclude") == [[0, 0, 0], [False] * 3]
    assert labels("onpolicy1", "on_road", "exclude") == [[1, 0, 1], [True] * 3]
