"""The planner: known optimum found by both planners, warm start, end-to-end headless drive with --json."""
import copy
import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from data_loader import episode_name, read_episode
import drive_mpc
import planner
from planner import MPCPolicy
from models import CostModel, ExpertPrior, Predictor, TinyEncoder, save_checkpoint
from train_predictor import file_hash

TARGET = (0.6, 0.3)          # (steer, longitudinal) that the hand-built judge likes best


class ZeroEncoder(torch.nn.Module):
    def forward(self, obs):
        return torch.zeros(len(obs), 2)


class ActionEcho:
    """Predicted latent at step h = (steer_h, gas_h - brake_h): the world simply shows the action."""

    def eval(self):
        return self

    def rollout(self, hist, actions):
        return torch.stack([actions[..., 0], actions[..., 1] - actions[..., 2]], -1)


class DistanceJudge:
    """Progress is highest when the latent equals TARGET; always on the road, always expert-like."""

    def eval(self):
        return self

    def __call__(self, z_now, z_next):
        d = (z_next[..., 0] - TARGET[0]) ** 2 + (z_next[..., 1] - TARGET[1]) ** 2
        big = torch.full_like(d, 50.0)
        return {"progress": -10 * d, "road": big, "expert": big}


def policy(planner):
    p = MPCPolicy(ZeroEncoder(), ActionEcho(), DistanceJudge(), "cpu", planner=planner, samples=1000,
                  horizon=15, beta=2.0, sigma=0.5, w_progress=1.0, w_road=1.0)   # the judge speaks by progress
    p.reset(np.random.default_rng(0))
    return p


def run_steps(p, n=8):
    frame = np.zeros((64, 64, 3), np.uint8)
    for _ in range(n):                                   # receding horizon: each plan starts from the last
        action, extras = p.act(frame)
    return action, extras


ZERO_PLAN_ENERGY = 15 * 10 * (TARGET[0] ** 2 + TARGET[1] ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icem_converges_on_the_known_best_sequence(seed):
    p = policy("icem")
    p.reset(np.random.default_rng(seed))
    action, extras = run_steps(p)
    assert action[0] == pytest.approx(TARGET[0], abs=0.05)
    assert action[1] == pytest.approx(TARGET[1], abs=0.05) and action[2] == 0.0
    assert np.all(np.abs(p.plan - np.array(TARGET)) < 0.1)
    assert float(extras["energy"]) < 0.05 * ZERO_PLAN_ENERGY and extras["plan_ms"] > 0


def test_shooting_picks_the_lowest_energy_candidate_and_closes_in(monkeypatch):
    p = policy("shooting")
    seen = []
    energy = p.energy
    monkeypatch.setattr(p, "energy", lambda hist, seqs: (seen.append((seqs.copy(), e := energy(hist, seqs))), e)[1])
    action, extras = run_steps(p)
    seqs, e = seen[-1]
    best = int(e.argmin())
    assert float(extras["energy"]) == pytest.approx(float(e[best]))
    assert action[0] == pytest.approx(seqs[best, 0, 0]) and action[1] == pytest.approx(max(seqs[best, 0, 1], 0))
    assert float(e[best]) < 0.4 * ZERO_PLAN_ENERGY                   # one random search of 1,000 per step


def test_warm_start_shifts_the_plan_by_one_step(monkeypatch):
    p = policy("shooting")
    best = np.stack([np.linspace(-1, 1, 15), np.linspace(0, 1, 15)], 1).astype(np.float32)
    monkeypatch.setattr(p, "_shooting", lambda hist: (best, 0.0))
    action, _ = p.act(np.zeros((64, 64, 3), np.uint8))
    assert action[0] == pytest.approx(-1.0) and action[1] == 0.0
    np.testing.assert_allclose(p.plan[:-1], best[1:])
    np.testing.assert_allclose(p.plan[-1], best[-1])


class FrameEncoder(torch.nn.Module):
    """Latent = the frame's first pixel value, repeated: each test frame is told apart by its latent."""

    def forward(self, obs):
        return obs[:, 0, 0, :1].float().expand(-1, 4)


@pytest.mark.parametrize("history", [1, 3])
def test_the_planner_feeds_the_predictor_as_many_past_latents_as_it_was_trained_on(history):
    predictor = Predictor(4, 8, 1, history)
    p = MPCPolicy(FrameEncoder(), predictor, CostModel(4, 8), "cpu", samples=30, horizon=3,
                  prior=ExpertPrior(4, 8))
    p.reset(np.random.default_rng(0))
    frames = [np.full((64, 64, 3), v, np.uint8) for v in (10, 20, 30, 40, 50)]
    with torch.inference_mode():
        seen = [p.observe(f)[0, :, 0].tolist() for f in frames[:2]]
    assert seen[0] == [10.0] * (history + 1)                   # before the start: the first frame stands in
    assert seen[1] == [10.0] * history + [20.0]
    for f in frames[2:]:
        p.act(f)                                               # predictor, judge and prior get their shapes
    with torch.inference_mode():
        assert p.observe(frames[0])[0, :, 0].tolist() == [30.0, 40.0, 50.0, 10.0][-history - 1:]


def test_shooting_keeps_the_warm_start_as_a_candidate():
    p = policy("shooting")
    p.plan[:] = TARGET                                   # already optimal: noise can only make it worse
    action, _ = p.act(np.zeros((64, 64, 3), np.uint8))
    assert action[0] == pytest.approx(TARGET[0]) and action[1] == pytest.approx(TARGET[1])


@pytest.fixture
def tiny_models(tmp_path):
    enc = tmp_path / "encoder_final.pth"
    save_checkpoint(enc, "encoder", TinyEncoder(width=8, latent=16))
    key = file_hash(enc)
    save_checkpoint(tmp_path / "predictor_final.pth", "predictor", Predictor(16, 32, 1, 1), encoder_hash=key)
    save_checkpoint(tmp_path / "cost_model_final.pth", "cost", CostModel(16, 16), encoder_hash=key)
    save_checkpoint(tmp_path / "prior_final.pth", "prior", ExpertPrior(16, 16), encoder_hash=key)
    return tmp_path


@pytest.mark.parametrize("policy,planner,prior,precision", [("mpc", "shooting", "none", "fp32"),
                                                            ("mpc", "icem", None, "bf16"),
                                                            ("prior", "icem", None, "fp32")])
def test_an_episode_drives_headless_end_to_end_and_reports_every_field(tiny_models, tmp_path, policy, planner,
                                                                       prior, precision):
    out = tmp_path / "mpc.json"
    r = subprocess.run([sys.executable, str(ROOT / "drive_mpc.py"), "--models-dir", str(tiny_models), "--headless",
                        "--episodes", "1", "--seed", "7", "--max-steps", "8", "--samples", "100",
                        "--policy", policy, "--planner", planner, "--json", str(out), "--precision", precision,
                        "--record", str(tmp_path / "d.mp4"), "--save-episodes", str(tmp_path / "drives"),
                        *(["--prior", prior] if prior else [])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("scores", "mean", "std", "sem", "tiles_fraction", "lap_finished", "off_road_share", "wrong_way_share",
                "median_speed", "steer_change", "label_steer_change", "plan_ms_median", "plan_ms_p95", "prior"):
        assert key in report
    assert report["seeds"] == [7] and report["plan_ms_median"] > 0 and report["policy"] == policy
    assert report["prior"] == (None if prior == "none" else str(tiny_models / "prior_final.pth"))
    assert report.get("planner") == (planner if policy == "mpc" else None)
    if policy == "mpc":
        assert report["mpc"]["precision"] == precision
        assert report["plan_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[precision]
        assert report["compiled"] is False                     # auto: tiny models are not worth compiling
    import imageio.v3 as iio
    assert iio.imread(tmp_path / "d.mp4").shape[0] == 8 * 4                  # every env frame: k per step
    arrays, meta = read_episode(tmp_path / "drives" / episode_name(7, 0, 8))
    assert meta["policy"] == policy and meta["score"] == pytest.approx(report["scores"][0], abs=0.01)
    assert np.isfinite(arrays["expert_action"]).all()                        # labelled whoever drove


def test_the_prior_alone_collects_labelled_drives_and_the_expert_is_refused(tiny_models, tmp_path):
    drive = [sys.executable, str(ROOT / "drive_mpc.py"), "--models-dir", str(tiny_models), "--headless",
             "--episodes", "1", "--seed", "3", "--max-steps", "6", "--workers", "1", "--precision", "fp32"]
    r = subprocess.run([*drive, "--policy", "prior", "--collect", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = (tmp_path / "d").glob("*.npz")
    arrays, meta = read_episode(path)
    assert len(arrays["obs"]) == 6 and meta["track_seed"] >= 1_000_000 and np.isfinite(arrays["expert_action"]).all()
    # The prior drove: fed the frames it saw, in order, it chooses every action the episode holds.
    spec = {"policy": "prior", "device": "cpu", "mpc": {"compile": "off"},
            **{k: str(tiny_models / f"{name}_final.pth") for k, name in
               (("encoder", "encoder"), ("predictor", "predictor"), ("cost", "cost_model"), ("prior", "prior"))}}
    alone = planner.PriorPolicy(drive_mpc.load_mpc(spec))
    alone.reset(np.random.default_rng(0))
    assert np.allclose([alone.act(f)[0] for f in arrays["obs"]], arrays["action"], atol=1e-6)
    r = subprocess.run([*drive, "--policy", "expert", "--collect", str(tmp_path / "e")], capture_output=True, text=True)
    assert r.returncode != 0 and "collect_race_data.py" in r.stderr


def test_bf16_planning_rounds_only_the_layers_and_ranks_plans_as_float32_does():
    torch.manual_seed(0)
    models = {"predictor": Predictor(16, 32, 2, 1), "cost": CostModel(16, 16), "prior": ExpertPrior(16, 16)}
    for m in models.values():                                  # a non-trivial normalisation
        m.set_normalisation(torch.randn(m.mu.shape), torch.rand(m.sd.shape) + 0.5)
    torch.nn.init.normal_(models["predictor"].net[-1].weight, std=0.1)   # it starts as "nothing changes"
    fp32, bf16 = [MPCPolicy(TinyEncoder(8, 16), *[copy.deepcopy(models[k]) for k in ("predictor", "cost")], "cpu",
                            prior=copy.deepcopy(models["prior"]), precision=prec) for prec in ("fp32", "bf16")]
    assert all(p.dtype == torch.bfloat16 for p in bf16.predictor.parameters())
    assert bf16.predictor.mu.dtype == bf16.cost.sd.dtype == bf16.prior.mu.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fp32.predictor.parameters())
    hist = torch.randn(1, 2, 16)
    seqs = np.random.default_rng(0).uniform(-1, 1, (200, 15, 2)).astype(np.float32)
    with torch.inference_mode():
        z32 = fp32.predictor.rollout(hist.expand(200, -1, -1), torch.from_numpy(seqs[..., [0, 1, 1]]))
        z16 = bf16.predictor.rollout(hist.expand(200, -1, -1), torch.from_numpy(seqs[..., [0, 1, 1]]))
        e32, e16 = fp32.energy(hist, seqs), bf16.energy(hist, seqs)
    assert z16.dtype == e16.dtype == torch.float32      # the running state and the energies stay float32
    assert 0 < (z16 - z32).abs().max() < 0.05 * z32.abs().max()
    assert np.corrcoef(e32.numpy(), e16.numpy())[0, 1] > 0.999


def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    assert planner.plan_dtype("fp32", "cpu") == torch.float32
    assert planner.plan_dtype("bf16", "cpu") == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        assert planner.plan_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
        assert planner.plan_dtype("auto", "cuda") == torch.float32


def tiny_policy(compile="off", **kw):
    torch.manual_seed(0)                                       # the same weights for every policy built here
    models = [Predictor(16, 32, 2, 1), CostModel(16, 16), ExpertPrior(16, 16)]
    torch.nn.init.normal_(models[0].net[-1].weight, std=0.1)   # it starts as "nothing changes"
    p = MPCPolicy(TinyEncoder(8, 16), *models[:2], "cpu", prior=models[2], samples=90, compile=compile, **kw)
    p.reset(np.random.default_rng(0))
    return p


def test_the_compiled_dream_judges_and_plans_as_the_uncompiled_one(monkeypatch, capsys):
    # Inductor's code generation takes half a minute even for tiny models, too long for the tests; the
    # "eager" backend still traces both functions through torch.compile (graph capture, dynamic batch
    # shapes, guards), which is what breaks when the dream's code changes. Inductor's own numbers are
    # checked by the scores it drives (README, "Planning time").
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plain, compiled = tiny_policy("off"), tiny_policy("on")
    assert not plain.compiled and compiled.compiled and "dream compiled" in capsys.readouterr().out
    assert compiled.judge is not compiled._judge and compiled.prior_dream is not compiled._prior_dream
    hist = torch.randn(1, 2, 16)
    with torch.inference_mode():
        np.testing.assert_allclose(compiled.prior_plan(hist), plain.prior_plan(hist), atol=1e-6)
        for n in (30, 31, 45):                                 # the batch sizes iCEM sends, and another
            seqs = np.random.default_rng(n).uniform(-1, 1, (n, 15, 2)).astype(np.float32)
            np.testing.assert_allclose(compiled.energy(hist, seqs), plain.energy(hist, seqs), rtol=1e-5, atol=1e-5)
    frames = np.random.default_rng(1).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    for frame in frames:                                       # a receding-horizon drive: the same actions
        np.testing.assert_allclose(compiled.act(frame)[0], plain.act(frame)[0], atol=1e-5)


def test_where_compiling_fails_the_planner_says_so_and_plans_uncompiled(monkeypatch, capsys):
    def broken(fn, **kw):                                      # as inductor without a C++ compiler
        def run(*a, **k):
            raise RuntimeError("no working C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    p = tiny_policy("on")
    assert not p.compiled and p.judge == p._judge and p.prior_dream == p._prior_dream
    assert "planning uncompiled: torch.compile failed (RuntimeError: no working C++" in capsys.readouterr().out
    action, extras = p.act(np.zeros((64, 64, 3), np.uint8))
    assert action.shape == (3,) and np.isfinite(extras["energy"])


def test_the_dream_splits_the_longitudinal_axis_as_the_env_actions_do():
    from carenv import longitudinal_to_action
    plan = np.random.default_rng(0).uniform(-1.5, 1.5, (40, 15, 2)).astype(np.float32)   # some out of bounds
    np.testing.assert_array_equal(tiny_policy().env_actions(torch.from_numpy(plan)).numpy(),
                                  longitudinal_to_action(plan[..., 0], plan[..., 1]))


def test_auto_compiles_the_dream_on_a_cpu_at_the_small_size_and_up():
    small, tiny = Predictor(128, 256, 2), Predictor(16, 32, 1)
    assert planner.compile_dream("auto", "cpu", small) and not planner.compile_dream("auto", "cpu", tiny)
    assert not planner.compile_dream("auto", "cuda", small)
    assert planner.compile_dream("on", "cpu", tiny) and not planner.compile_dream("off", "cpu", small)


def test_a_worker_builds_its_driver_once_for_all_its_tracks(monkeypatch, tiny_models):
    built = []
    monkeypatch.setattr(drive_mpc, "load_mpc", lambda spec: built.append(spec) or object())
    monkeypatch.setattr(drive_mpc, "_BUILT", {})
    job = {"policy": "mpc", "device": "cpu", "prior": None, "mpc": {"compile": "auto"}, "seed": 0,
           **{k: str(tiny_models / f"{name}_final.pth") for k, name in
              (("encoder", "encoder"), ("predictor", "predictor"), ("cost", "cost_model"))}}
    first = drive_mpc._driver(job)
    assert drive_mpc._driver({**job, "seed": 1}) is first and len(built) == 1   # the next track: no rebuild
    second = drive_mpc._driver({**job, "mpc": {"compile": "off"}})
    assert second is not first and len(built) == 2
    save_checkpoint(job["cost"], "cost", CostModel(16, 16))                    # retrained in place
    assert drive_mpc._driver({**job, "mpc": {"compile": "off"}}) is not second and len(built) == 3
    drive_mpc._driver({**job, "policy": "prior", "prior": str(tiny_models / "prior_final.pth")})
    assert built[-1]["mpc"]["compile"] == "off"                                # the prior alone: never compiled
    # The collectors make a policy per episode (collection._work): the on-policy driver reuses the MPC too.
    drivers = [drive_mpc.OnPolicyDriver(job, threads=torch.get_num_threads()) for _ in range(2)]
    assert drivers[0].mpc is drivers[1].mpc and len(built) == 5


def test_score_summary_gives_the_standard_error_of_the_mean():
    r = drive_mpc.score_summary(np.array([600.0, 700.0, 800.0, 900.0]))
    assert r["mean"] == 750.0 and r["median"] == 750.0
    assert r["std"] == pytest.approx(111.8034, abs=1e-3)                    # population std, as reported
    assert r["sem"] == pytest.approx(129.0994 / 2, abs=1e-3)                # sample std / sqrt(n)
    assert drive_mpc.score_summary(np.array([812.0]))["sem"] is None        # one track: no spread to measure


def test_episode_summary_counts_driving_the_wrong_way_on_the_road():
    ep = {"score": 1.0, "tiles_fraction": 0.5, "lap_finished": False, "obs": np.zeros((4, 64, 64, 3), np.uint8),
          "on_road": np.array([True, True, True, False]), "speed": np.array([10.0, 20.0, 30.0, 40.0]),
          "heading_err": np.array([0.1, 3.0, -2.0, 3.1]),   # forward, backwards, backwards, backwards off-road
          "action": np.array([[0.0, 1, 0], [0.5, 1, 0], [-0.5, 0, 0], [-0.5, 0, 1]]),
          "expert_action": np.array([[0.1, 1, 0], [0.2, 0, 0], [0.2, 0, 0], [0.5, 0, 0]])}
    r = drive_mpc.episode_summary(ep)
    assert r["wrong_way_share"] == 0.5 and r["off_road_share"] == 0.25 and r["median_speed"] == 25.0
    assert r["steer_change"] == pytest.approx(1.5 / 3) and r["label_steer_change"] == pytest.approx(0.4 / 3)
    assert "plan_ms" not in r


def test_the_last_on_policy_round_drives_by_default(tmp_path):
    assert drive_mpc.latest_round(tmp_path) == tmp_path                     # no round yet: round 0's models
    for r, files in ((1, ("predictor_final.pth", "cost_model_final.pth")), (2, ("predictor_final.pth",)),
                     (10, ("predictor_final.pth", "cost_model_final.pth"))):
        (tmp_path / f"onpolicy{r}").mkdir()
        for f in files:
            (tmp_path / f"onpolicy{r}" / f).write_bytes(b"")
    (tmp_path / "onpolicy_old").mkdir()
    assert drive_mpc.latest_round(tmp_path) == tmp_path / "onpolicy10"      # numeric order; round 2 is unfinished
    latest = drive_mpc.latest_round(tmp_path)
    assert drive_mpc.newest_prior(tmp_path, latest) == tmp_path / "prior_final.pth"   # round 0's: no DAgger prior
    (latest / "prior_final.pth").write_bytes(b"")                           # pipeline.py's DAgger stage ran
    assert drive_mpc.newest_prior(tmp_path, latest) == latest / "prior_final.pth"
    assert drive_mpc.newest_judge(latest) == latest / "cost_model_final.pth"       # the round's judge
    (latest / "dagger").mkdir()
    (latest / "dagger" / "prior_final.pth").write_bytes(b"")                # the retrained prior alone: still it
    assert drive_mpc.newest_judge(latest) == latest / "cost_model_final.pth"
    (latest / "dagger" / "cost_model_final.pth").write_bytes(b"")           # the judge trained on the DAgger drives:
    assert drive_mpc.newest_judge(latest) == latest / "cost_model_final.pth"       # unchecked, not used unasked
    (latest / "cost_model_kept.pth").write_bytes(b"")                       # pipeline.py's choice of the two
    assert drive_mpc.newest_judge(latest) == latest / "cost_model_kept.pth"


def refusal(models_dir) -> str:
    """drive_mpc.py's message when it will not drive (in-process: a subprocess per case costs seconds)."""
    with pytest.raises(SystemExit) as stop:
        drive_mpc.main(drive_mpc.parser().parse_args(["--models-dir", str(models_dir), "--headless",
                                                      "--max-steps", "2"]))
    return str(stop.value)


def test_a_mismatched_checkpoint_names_the_stage_to_run(tiny_models):
    save_checkpoint(tiny_models / "encoder_final.pth", "encoder", TinyEncoder(width=8, latent=16))   # retrained
    assert "run train_predictor.py again" in refusal(tiny_models)
    key = file_hash(tiny_models / "encoder_final.pth")
    for name, kind, model in (("predictor_final.pth", "predictor", Predictor(16, 32, 1, 1)),
                              ("cost_model_final.pth", "cost", CostModel(16, 16))):
        save_checkpoint(tiny_models / name, kind, model, encoder_hash=key)
    assert "run train_prior.py again" in refusal(tiny_models)                        # only the prior is stale
    (tiny_models / "prior_final.pth").unlink()
    assert "run train_prior.py first" in refusal(tiny_models)
    assert "run train_encoder.py first" in refusal(tiny_models / "none")


PAGE_FAULTS = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from benchmark import preset_policy
mpc = preset_policy("small", prior=True)
frame = np.zeros((64, 64, 3), np.uint8)
for _ in range(3):                                    # the heap grows to its working size
    mpc.act(frame)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mpc.act(frame)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(np.median(faults))                              # a rare one-off growth of the heap is not the pattern
"""


def test_planning_reuses_freed_memory_instead_of_faulting_in_new_pages():
    from presets import reuse_freed_memory
    if not reuse_freed_memory():
        pytest.skip("not glibc: the system allocator is left as it is")
    # A fresh process: the allocator's settings are per process. At the small size, without the setting,
    # glibc gave the kernel back each decision's activations: 500-16,000 page faults per plan here.
    r = subprocess.run([sys.executable, "-c", PAGE_FAULTS, str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 100
