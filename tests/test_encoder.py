"""VICReg encoder, checkpoints, DDP and the decoder watcher on tiny synthetic data (CPU)."""
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import ROOT, write_sources
from models import BasicBlock, CheckpointError, TinyDecoder, TinyEncoder, build, load_checkpoint, save_checkpoint
from probes import LinearProbe, probe_report, r2_score, view_targets
import train_decoder
import train_encoder
from train_encoder import augment, effective_rank, vicreg_terms


@pytest.fixture
def tiny_data(tmp_path):
    """Three sources of 3 episodes x 30 rows (synthetic pixels)."""
    return write_sources(tmp_path, rows=30, tag_step=60)


def encoder_args(dirs, out, *extra):
    argv = ["--preset", "tiny", "--device", "cpu", "--out-dir", str(out), "--race-dir", dirs["race"],
            "--recovery-dir", dirs["recovery"], "--random-dir", dirs["random"], "--val-frac", "0.34", *extra]
    return train_encoder.parser().parse_args(argv)


def test_variance_term_is_zero_when_spread_and_large_when_collapsed():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 32, generator=g) * 3
    assert vicreg_terms(spread, spread)["var"].item() == 0.0
    collapsed = torch.ones(512, 32) + 1e-4 * torch.randn(512, 32, generator=g)
    assert vicreg_terms(collapsed, collapsed)["var"].item() > 0.95


def test_invariance_and_covariance_terms():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2048, 16, generator=g)
    t = vicreg_terms(z, z)
    assert t["inv"].item() == 0.0 and t["cov"].item() < 0.02           # independent dims: ~no covariance
    correlated = torch.cat([z[:, :1]] * 16, 1)                          # every dim the same signal
    assert vicreg_terms(correlated, correlated)["cov"].item() > 10
    assert vicreg_terms(z, z + 1)["inv"].item() == pytest.approx(1.0)


def test_augmentation_parameters_are_drawn_per_sample_and_never_flip():
    x = torch.rand(16, 3, 64, 64)
    views, params = augment(x, torch.Generator().manual_seed(0), shift=2.0, scale_min=0.9, jitter=0.1)
    assert views.shape == x.shape and views.min() >= 0 and views.max() <= 1
    for col in range(params.shape[1]):
        assert len(torch.unique(params[:, col])) == 16                  # every sample its own draw
    assert params[:, 0].min() > 0                                       # scale never negative: no mirror image


def test_effective_rank_counts_used_dimensions():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1000, 8, generator=g)
    one = torch.randn(1000, 1, generator=g) * torch.ones(1, 8)
    assert effective_rank(full) > 7 and effective_rank(one) < 1.1


def test_view_targets_fold_a_backwards_car_onto_what_the_frame_shows():
    state = {"lateral": torch.tensor([2.0, 2.0, -3.0, 1.0]),
             "heading_err": torch.tensor([0.3, 3.0, -2.9, -1.4])}
    v = view_targets(state)
    assert torch.allclose(v["lateral_view"], torch.tensor([2.0, -2.0, 3.0, 1.0], dtype=torch.float64))
    expected = torch.tensor([0.3, 3.0 - torch.pi, -2.9 + torch.pi, -1.4], dtype=torch.float64)
    assert torch.allclose(v["heading_view"], expected, atol=1e-6)


def test_the_axial_heading_is_continuous_where_the_folded_one_jumps():
    """A latent that holds the road's axis as a picture does (one line, the same at +pi/2 and -pi/2):
    the doubled angle is linear in it, the folded heading is not (it jumps between +-pi/2)."""
    g = torch.Generator().manual_seed(0)
    heading = (torch.rand(3000, generator=g) * 2 - 1) * torch.pi
    state = {"lateral": torch.zeros(3000), "heading_err": heading}
    v = view_targets(state)
    across = torch.tensor([torch.pi / 2 - 0.01, -torch.pi / 2 + 0.01])      # a road square across the car
    edge = view_targets({"lateral": torch.zeros(2), "heading_err": across})
    assert (edge["heading_view"][0] - edge["heading_view"][1]).abs() > 3           # the fold jumps by ~pi
    assert torch.allclose(edge["heading_axial"][0], edge["heading_axial"][1], atol=0.05)   # one picture, one target
    z = v["heading_axial"].float()
    axial = LinearProbe("ridge").fit(z[:2000], v["heading_axial"][:2000]).score(z[2000:], v["heading_axial"][2000:])
    folded = LinearProbe("ridge").fit(z[:2000], v["heading_view"][:2000]).score(z[2000:], v["heading_view"][2000:])
    assert axial > 0.99 and folded < 0.9


def test_r2_pools_columns_around_their_own_means():
    y = torch.tensor([[0.0, 10.0], [1.0, 12.0], [2.0, 14.0], [3.0, 16.0]], dtype=torch.float64)
    assert r2_score(y, y) == 1.0
    half = torch.stack([y[:, 0], torch.full((4,), 13.0, dtype=torch.float64)], 1)   # exact, then the mean
    assert abs(r2_score(half, y) - 1 / 5) < 1e-9          # SST 5 + 20, SSE 20 on the second column


def test_probe_report_reads_what_the_latent_holds():
    """A latent that holds the car-frame offset and nose angle (as a frame does) but not which way the
    track runs: the view probes read it, the track-frame lateral probe cannot on backwards cars."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        heading = (torch.rand(n, generator=g) * 2 - 1) * torch.pi
        lateral = (torch.rand(n, generator=g) * 2 - 1) * 12
        state = {"speed": torch.rand(n, generator=g) * 80, "yaw_rate": torch.randn(n, generator=g),
                 "lateral": lateral, "heading_err": heading, "on_road": lateral.abs() < 6.7}
        v = view_targets(state)
        z = torch.stack([state["speed"], state["yaw_rate"], v["lateral_view"].float(), v["heading_view"].float(),
                         *v["heading_axial"].float().T, state["on_road"].float() * 4 - 2,
                         *torch.randn(3, n, generator=g) * 0.01], 1)
        return z, state
    (z_tr, s_tr), (z_va, s_va) = split(2000), split(500)
    out = probe_report(z_tr, s_tr, z_va, s_va)
    assert out["speed_r2"] > 0.99 and out["yaw_rate_r2"] > 0.99 and out["on_road_acc"] > 0.99
    assert out["lateral_view_r2"] > 0.99 and out["heading_view_r2"] > 0.99 and out["heading_axial_r2"] > 0.99
    assert out["lateral_r2"] < 0.5                              # half the cars face backwards
    assert 0.4 < out["facing_backwards_share_val"] < 0.6


def test_direction_probe_reads_it_only_where_the_latent_holds_it():
    """Facing along vs against the track, near the road only: chance without it in the latent, ~1 with it."""
    g = torch.Generator().manual_seed(1)

    def split(n, with_direction):
        heading = (torch.rand(n, generator=g) * 2 - 1) * torch.pi
        lateral = (torch.rand(n, generator=g) * 2 - 1) * 30
        state = {"speed": torch.rand(n, generator=g), "yaw_rate": torch.randn(n, generator=g),
                 "lateral": lateral, "heading_err": heading, "on_road": lateral.abs() < 6.7}
        z = torch.randn(n, 4, generator=g)
        target, near = (torch.cos(heading) >= 0).float(), lateral.abs() < 15     # forward; the road in view
        if with_direction:      # held where the label is; far off the road the latent says the opposite
            z[:, 0] = torch.where(near, target, 1 - target) * 2 - 1 + 0.1 * z[:, 0]
        return z, state
    for with_direction, lo, hi in ((False, 0.4, 0.6), (True, 0.99, 1.0)):
        out = probe_report(*split(3000, with_direction), *split(1000, with_direction))
        assert lo <= out["facing_forward_auc"] <= hi and lo <= out["facing_forward_balanced_acc"] <= hi, out


def test_encoder_shapes_and_latent_size():
    enc = TinyEncoder(width=8, latent=32)
    z = enc(torch.randint(0, 255, (5, 64, 64, 3), dtype=torch.uint8))
    assert z.shape == (5, 32)
    assert TinyDecoder(latent=32, width=8)(z).shape == (5, 3, 64, 64)


def test_mask_steer_blanks_the_steering_gauge_and_keeps_the_other_gauges():
    """On real frames steering left and right: every gauge-green pixel is blanked, the gyro's red is not."""
    import numpy as np
    from carenv import make_env, to_model_frame
    from models import prepare_frames
    env, frames = make_env(), []
    for steer in (-1.0, 1.0):
        env.reset(seed=3)
        for a in [(0.0, 0.5, 0.0)] * 50 + [(steer, 0.3, 0.0)] * 12:
            obs = env.step(np.array(a, np.float32))[0]
        frames.append(to_model_frame(obs))
    env.close()
    x = torch.from_numpy(np.stack(frames))
    kept, masked = prepare_frames(x, "mask_score"), prepare_frames(x, "mask_steer")
    r, g, b = kept[:, 0], kept[:, 1], kept[:, 2]
    hud = torch.arange(64).view(1, 64, 1) >= 56                     # the HUD's rows (grass and kerbs above)
    green = hud & (g > r + 0.15) & (g > b + 0.15)                    # [2,64,64] the gauge's bar
    red = hud & (r > g + 0.15) & (r > b + 0.15)                      # the gyro's bar, to its right
    assert green[0].any() and green[1].any() and red.any()
    assert (masked.permute(1, 0, 2, 3)[:, green] == 0).all()
    assert torch.equal(masked.permute(1, 0, 2, 3)[:, red], kept.permute(1, 0, 2, 3)[:, red])
    assert torch.equal(masked[:, :, :56], kept[:, :, :56])             # the scene above the HUD untouched


@pytest.mark.parametrize("c_in,stride", [(16, 1), (8, 1), (8, 2)])
def test_basic_block_is_torchvisions_weight_for_weight(c_in, stride):
    """models.BasicBlock replaces torchvision's (whose import costs each stage ~1.5 s): checkpoints must load
    across the two and compute the same thing, in training (batch statistics) and in eval mode, with the
    identity skip and with the 1x1 projection (more channels, or a stride)."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock
    project = c_in != 16 or stride != 1
    down = lambda: torch.nn.Sequential(torch.nn.Conv2d(c_in, 16, 1, stride=stride, bias=False),  # noqa: E731
                                       torch.nn.BatchNorm2d(16)) if project else None
    torch.manual_seed(0)
    theirs = TorchvisionBlock(c_in, 16, stride, down())
    ours = BasicBlock(c_in, 16, stride, down())
    with torch.no_grad():                    # non-trivial batch-norm parameters and running statistics
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)   # raises on a missing, extra or misshapen tensor
    x = torch.randn(4, c_in, 12, 12)
    for train in (True, False):
        theirs.train(train), ours.train(train)
        y = ours(x)
        assert y.shape == (4, 16, 12 // stride, 12 // stride)
        assert torch.equal(y, theirs(x))


def test_resume_continues_the_run_exactly(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train_encoder.main(encoder_args(tiny_data, straight, "--epochs", "2"))
    split = tmp_path / "split"                                          # as if killed after epoch 1
    split.mkdir()
    shutil.copy(straight / "encoder_mixed_ep1.pth", split)
    train_encoder.main(encoder_args(tiny_data, split, "--epochs", "2", "--resume"))
    a = load_checkpoint(straight / "encoder_mixed_ep2.pth", "encoder")
    b = load_checkpoint(split / "encoder_mixed_ep2.pth", "encoder")
    assert a["stats"][-1]["loss"] == b["stats"][-1]["loss"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    probes = json.loads((straight / "encoder_probes.json").read_text())
    assert {"speed_r2", "yaw_rate_r2", "lateral_r2", "heading_err_r2", "on_road_acc"} <= set(probes)
    lines = (straight / "encoder_stats.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] and (straight / "encoder_loss.png").exists()
    assert build(load_checkpoint(straight / "encoder_final.pth", "encoder")).latent == 32


def test_resume_with_another_architecture_names_the_mismatch(tiny_data, tmp_path):
    train_encoder.main(encoder_args(tiny_data, tmp_path / "m", "--epochs", "1"))
    with pytest.raises(CheckpointError, match="width: checkpoint 8 vs model 16"):
        train_encoder.main(encoder_args(tiny_data, tmp_path / "m", "--epochs", "2", "--resume", "--width", "16"))


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train_encoder.main(encoder_args(tiny_data, out, "--epochs", "1"))
    monkeypatch.setattr(train_encoder, "vicreg_terms", lambda a, b: {k: torch.tensor(float("nan"), requires_grad=True)
                                                                     for k in ("inv", "var", "cov")})
    with pytest.raises(SystemExit, match="loss became nan.*encoder_mixed_ep1.pth"):
        train_encoder.main(encoder_args(tiny_data, out, "--epochs", "2", "--resume"))
    assert not (out / "encoder_mixed_ep2.pth").exists()
    load_checkpoint(out / "encoder_mixed_ep1.pth", "encoder")


def test_checkpoints_refuse_code_and_wrong_kinds(tmp_path):
    save_checkpoint(tmp_path / "d.pth", "decoder", TinyDecoder(16, 8))
    with pytest.raises(CheckpointError, match="holds a decoder, expected a encoder.*train_encoder"):
        load_checkpoint(tmp_path / "d.pth", "encoder", stage="train_encoder.py")
    torch.save({"format": 1, "kind": "encoder", "evil": Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not found.*train_encoder"):
        load_checkpoint(tmp_path / "missing.pth", stage="train_encoder.py")


def test_torchrun_two_cpu_processes_train_an_epoch(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_encoder.py"), "--preset", "tiny", "--device", "cpu", "--epochs", "1",
           "--out-dir", str(out), "--race-dir", tiny_data["race"], "--recovery-dir", tiny_data["recovery"],
           "--random-dir", tiny_data["random"], "--val-frac", "0.34"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(out / "encoder_mixed_ep1.pth", "encoder")
    assert len(ckpt["rng"]) == 2                                        # both ranks' RNG kept for resume
    assert (out / "encoder_final.pth").exists()


def test_decoder_watcher_handles_new_checkpoints_and_skips_broken_ones(tiny_data, tmp_path, capsys):
    models = tmp_path / "models"
    train_encoder.main(encoder_args(tiny_data, models, "--epochs", "1"))
    good = (models / "encoder_mixed_ep1.pth").read_bytes()
    (models / "encoder_mixed_ep2.pth").write_bytes(good[: len(good) // 3])      # half-copied
    (models / ".encoder_mixed_ep3.pth.x1y2.tmp").write_bytes(good[:100])        # a write in progress
    os.utime(models / "encoder_final.pth")                                     # the encoder finished after
    argv = ["--preset", "tiny", "--device", "cpu", "--models-dir", str(models), "--out-dir", str(tmp_path / "vis"),
            "--race-dir", tiny_data["race"], "--recovery-dir", tiny_data["recovery"], "--random-dir",
            tiny_data["random"], "--val-frac", "0.34", "--retries", "2", "--poll", "0.01"]
    train_decoder.main(train_decoder.parser().parse_args(argv))               # returns: final exists
    out = capsys.readouterr().out
    assert (tmp_path / "vis" / "reconstruct_ep1.png").exists()
    assert not (tmp_path / "vis" / "reconstruct_ep2.png").exists()
    assert "skipping for now" in out and "encoder_mixed_ep2.pth" in out and "giving up on epoch 2" in out
    rows = [json.loads(x) for x in (tmp_path / "vis" / "decoder_stats.jsonl").read_text().splitlines()]
    assert [r["encoder_epoch"] for r in rows] == [1] and rows[0]["psnr_db"] > 0
    assert load_checkpoint(models / "decoder.pth", "decoder")["encoder_epoch"] == 1
