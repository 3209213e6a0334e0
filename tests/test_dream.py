"""visualise_dream.py: the GIF's frames and layout, what each panel shows, and the missing-checkpoint error."""
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import write_sources
from models import CheckpointError, Predictor, TinyDecoder, TinyEncoder, save_checkpoint
import visualise_dream as vd
from train_predictor import latent_caches

H = 4


@pytest.fixture
def setup(tmp_path):
    """Three sources of 3 episodes x 30 rows and tiny checkpoints -> command-line arguments for them."""
    dirs = write_sources(tmp_path, rows=30, tag_step=10)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "enc.pth", "encoder", TinyEncoder(width=8, latent=16))
    save_checkpoint(tmp_path / "dec.pth", "decoder", TinyDecoder(latent=16, width=8))
    save_checkpoint(tmp_path / "pred.pth", "predictor", Predictor(latent=16, hidden=32, layers=1, history=1))
    return dirs, ["--device", "cpu", "--val-frac", "0.34", "--horizon", str(H), "--out-dir", str(tmp_path),
                  "--race-dir", dirs["race"], "--recovery-dir", dirs["recovery"], "--random-dir", dirs["random"],
                  "--encoder", str(tmp_path / "enc.pth"), "--decoder", str(tmp_path / "dec.pth"),
                  "--predictor", str(tmp_path / "pred.pth")]


def test_gif_has_one_frame_per_step_and_the_grid_layout(setup, tmp_path):
    _, argv = setup
    vd.main(vd.parser().parse_args(argv + ["--starts", "4", "--out", "dream.gif"]))
    frames = iio.imread(tmp_path / "dream.gif", index=None)
    assert frames.shape[0] == H + 1
    height = vd.HEADER_H + 4 * (vd.LABEL_H + vd.TILE + vd.GAP)
    width = vd.GAP + 5 * (vd.TILE + vd.GAP)
    assert frames.shape[1:3] == (height, width)


def test_panels_hold_the_real_future_and_the_dreams_start_from_z_t(setup, tmp_path):
    dirs, _ = setup
    _, val, _ = latent_caches(tmp_path / "enc.pth", dirs, 0.34, 0, "cpu")
    starts = vd.pick_starts(val, 4, H, seed=0)
    assert [s for s, _ in starts] == [0, 0, 1, 2]                            # race, recovery, random in turn
    z, actions, real = vd.gather_starts(val, starts, H, 1)
    assert z.shape == (4, 2, 16) and actions.shape == (4, H, 3) and real.shape == (4, H + 1, 64, 64, 3)
    for i, (s, t) in enumerate(starts):
        np.testing.assert_array_equal(z[i].numpy(), val.latents[s][t - 1:t + 1])           # z_{t-1}, z_t
        assert np.all(np.diff(real[i, :, 0, 1, 0].astype(int)) == 1)                       # rows t .. t+H in order
        np.testing.assert_array_equal(real[i, 0], val.data.caches[s].frames(np.array([t]))[0])

    predictor = Predictor(latent=16, hidden=32, layers=1, history=1).eval()
    torch.nn.init.normal_(predictor.net[-1].weight, std=0.5)                 # so that actions change the dream
    decoder = TinyDecoder(latent=16, width=8).eval()
    out = vd.dream(predictor, decoder, z, actions)
    assert out.shape == (4, 1 + len(vd.ACTIONS), H + 1, 64, 64, 3)
    with torch.no_grad():
        now = decoder(z[:, -1]).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        real_dream = decoder(predictor.rollout(z, actions)[:, -1])
    for p in range(out.shape[1]):
        np.testing.assert_array_equal(out[:, p, 0], now)                     # h=0: decoder(z_t) everywhere
    last = real_dream.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out[:, 0, -1].astype(int) - last).max() <= 1               # panel 2 follows the real actions
    assert not np.array_equal(out[:, 1, 1:], out[:, 3, 1:])                  # hard left != hard right


def test_missing_predictor_names_the_stage_to_run(setup, tmp_path):
    _, argv = setup
    args = vd.parser().parse_args(argv + ["--predictor", str(tmp_path / "nope.pth")])
    with pytest.raises(CheckpointError, match="train_predictor.py"):
        vd.main(args)
    assert not (tmp_path / "output_dream.gif").exists()
    with pytest.raises(SystemExit, match="give a .gif path"):
        vd.main(vd.parser().parse_args(argv + ["--out", "dream.mp4"]))
