"""The expert prior: what it learns from, how the planner dreams it, and what its energy term costs."""
import json

import numpy as np
import pytest
import torch

from conftest import write_sources, write_synthetic
from data_loader import EpisodeData, LatentCache, read_episode, write_episode
from planner import MPCPolicy
from models import ExpertPrior, TinyEncoder, load_checkpoint, save_checkpoint
from test_mpc import ActionEcho, ZeroEncoder
import train_prior
from train_prior import expert_steps

C = torch.tensor([0.3, -0.4])


class HalfPlusC(torch.nn.Module):
    """A prior that depends on both states it sees: the expert's action = 0.5 * z_now + 0.25 * z_prev + C."""

    def forward(self, z_prev, z_now):
        return 0.5 * z_now + 0.25 * z_prev + C


class FlatJudge:
    """Every dream is on the road and expert-like: only the prior's term is left in the energy."""

    def eval(self):
        return self

    def __call__(self, z_now, z_next):
        big = torch.full(z_next.shape[:-1], 50.0)
        return {"progress": torch.zeros_like(big), "road": big, "expert": big}


def prior_policy(planner="icem", prior_steps=0):
    p = MPCPolicy(ZeroEncoder(), ActionEcho(), FlatJudge(), "cpu", planner=planner, samples=600, horizon=6,
                  prior=HalfPlusC(), w_prior=1.0, prior_steps=prior_steps)
    p.reset(np.random.default_rng(0))
    return p


def closed_loop(h=6):
    """The prior driving in the ActionEcho world (the latent shows the last action), from latent 0."""
    a, before, out = torch.zeros(2), torch.zeros(2), []
    for _ in range(h):
        a, before = (0.5 * a + 0.25 * before + C).clamp(-1, 1), a
        out.append(a)
    return torch.stack(out).numpy()


def test_the_prior_plan_is_its_closed_loop_drive_in_the_dream():
    p = prior_policy()
    with torch.inference_mode():
        plan = p.prior_plan(torch.zeros(1, 2, 2))
    np.testing.assert_allclose(plan, closed_loop(), atol=1e-6)


@pytest.mark.parametrize("prior_steps,counted", [(0, 6), (3, 3), (6, 6), (9, 6)])
def test_the_energy_charges_the_squared_distance_to_the_prior_in_each_dreamt_state(prior_steps, counted):
    p = prior_policy(prior_steps=prior_steps)
    seqs = np.random.default_rng(0).uniform(-1, 1, (6, 6, 2)).astype(np.float32)
    seqs[0] = closed_loop()
    seqs[5, :counted] = closed_loop()[:counted]                       # the prior's own plan where it is counted
    with torch.inference_mode():
        e = p.energy(torch.zeros(1, 2, 2), seqs).numpy()
    # In the echo world the state of step h shows action h-1 and the one before it action h-2.
    shown = np.concatenate([np.zeros((6, 2, 2), np.float32), seqs[:, :-1]], 1)           # [6,H+1,2]
    want = np.clip(0.5 * shown[:, 1:] + 0.25 * shown[:, :-1] + C.numpy(), -1, 1)
    np.testing.assert_allclose(e, ((seqs - want) ** 2)[:, :counted].sum((1, 2)), rtol=1e-4, atol=1e-4)
    # Only the first `counted` steps cost: a plan that leaves the prior after them costs nothing either.
    assert e[0] == pytest.approx(0.0, abs=1e-6) and (e[1:5] > 0.1).all()
    assert e[5] == pytest.approx(0.0, abs=1e-6)
    p.w_prior = 0.0                                                   # the weight switches it off
    with torch.inference_mode():
        assert float(p.energy(torch.zeros(1, 2, 2), seqs).abs().max()) < 1e-6


@pytest.mark.parametrize("planner", ["shooting", "icem"])
def test_with_a_flat_judge_the_planner_follows_the_prior(planner):
    action, _ = prior_policy(planner).act(np.zeros((64, 64, 3), np.uint8))
    first = closed_loop()[0]                                           # (0.3, -0.4): steer right, brake 0.4
    assert action[0] == pytest.approx(first[0], abs=1e-5)
    assert action[1] == 0.0 and action[2] == pytest.approx(-first[1], abs=1e-5)


def test_expert_steps_are_race_and_recovery_outside_mistakes(tmp_path):
    dirs = write_sources(tmp_path, episodes=2, rows=20)
    path = sorted((tmp_path / "recovery").glob("*.npz"))[0]
    ep, meta = read_episode(path)
    ep["mistake"][5:10] = True                                          # injected mistakes are not the expert
    ep["action"][:] = [0.25, 0.75, 0.5]
    write_episode(path, ep, meta)
    cache = LatentCache(EpisodeData(dirs, "all"), "k", 1, lambda f: f[:, 0, :1, 0].astype(np.float32))
    t = expert_steps(cache)
    tags = t["z_now"][:, 0].numpy()                                     # pixel (0,0): the episode's tag
    assert set(np.unique(tags)) == {0, 1, 60, 61}                       # race 0-1 and recovery 60-61, not random
    # rows 0..18 of each episode (t+1 in it; row 0 stands in for t-1 at the start), minus the 5 mistakes
    assert len(tags) == 4 * 19 - 5
    assert torch.equal(t["z_prev"][:, 0], t["z_now"][:, 0])             # the same episode on both sides
    mine = t["target"][torch.from_numpy(tags == 60)]
    assert torch.allclose(mine, torch.tensor([0.25, 0.25]))             # (steer, gas - brake)


def test_the_mpc_drives_teach_the_prior_with_the_experts_labels(tmp_path):
    dirs = write_sources(tmp_path, episodes=1, rows=20)
    dirs["onpolicy1"] = str(tmp_path / "onpolicy1")
    write_synthetic(dirs["onpolicy1"], 2, 20, tag0=200)
    paths = sorted((tmp_path / "onpolicy1").glob("*.npz"))
    for p, label in zip(paths, ([0.5, 0.25, 0.0], np.nan)):             # the second drive predates the label
        ep, meta = read_episode(p)
        ep["expert_action"][:] = label
        ep["mistake"][:] = 1                                             # not what decides for the MPC's drives
        ep["on_road"][:], ep["heading_err"][:] = True, 0.1
        ep["on_road"][3:6] = False                                       # off the road
        ep["heading_err"][8:11] = 3.0                                    # on it, facing the wrong way
        ep["heading_err"][12] = -0.6                                     # just past FORWARD_HEADING
        write_episode(p, ep, meta)
    # latent = pixels (0,0) and (0,1): the episode's tag and the row
    cache = LatentCache(EpisodeData(dirs, "all"), "k", 2, lambda f: f[:, 0, :2, 0].astype(np.float32))
    forward = [r for r in range(19) if r not in (3, 4, 5, 8, 9, 10, 12)]   # rows 0..18 have a t+1
    for steps, rows in (("all", list(range(19))), ("forward", forward)):
        t = expert_steps(cache, steps)
        tags = t["z_now"][:, 0].numpy()
        assert set(np.unique(tags)) == {0, 60, 200}                     # race, recovery, the labelled drive
        mine = torch.from_numpy(tags == 200)
        assert t["z_now"][mine, 1].tolist() == rows
        assert torch.allclose(t["target"][mine], torch.tensor([0.5, 0.25]))   # the label, not the action


def test_train_prior_end_to_end_writes_a_checkpoint_the_driver_can_check(tmp_path):
    dirs = write_sources(tmp_path, rows=30)
    enc = tmp_path / "encoder_final.pth"
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    args = train_prior.parser().parse_args(
        ["--preset", "tiny", "--device", "cpu", "--encoder", str(enc), "--out-dir", str(tmp_path),
         "--val-frac", "0.34", *[x for s, d in dirs.items() for x in (f"--{s}-dir", d)]])
    train_prior.main(args)
    ckpt = load_checkpoint(tmp_path / "prior_final.pth", "prior")
    assert ckpt["config"] == {"latent": 16, "hidden": 32, "members": 1} and ckpt["encoder_hash"]
    stats = json.loads((tmp_path / "prior_stats.json").read_text())
    assert len(stats["per_epoch"]) == 2 and set(stats["val"]) == {"epoch", "steer_r2", "longitudinal_r2"}
    assert stats["sources"] == ["race", "recovery"]


def test_the_prior_is_the_mean_of_its_members_and_they_differ():
    model = ExpertPrior(8, 16, members=3)
    z0, z1 = torch.randn(5, 8), torch.randn(5, 8)
    each = model(z0, z1, every=True)
    assert each.shape == (3, 5, 2) and torch.allclose(model(z0, z1), each.mean(0))
    assert not torch.allclose(each[0], each[1])                        # different initialisations


def test_expert_prior_learns_a_mapping_it_can_express():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    target = torch.tanh(torch.stack([z1[:, 0] - z0[:, 1], z1[:, 2]], 1))
    model = ExpertPrior(8, 64)
    model.set_normalisation(torch.cat([z0, z1], 1).mean(0), torch.cat([z0, z1], 1).std(0))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(z0, z1), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * target.var()
