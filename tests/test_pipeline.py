"""pipeline.py: the staleness rule, a failing stage, and the tiny preset end to end (run, resume, --force)."""
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
import gate
import pipeline
from data_loader import read_episode
from models import load_checkpoint
from presets import EVAL_SEED_LIMIT, PRESETS

# One thread per process: on a CPU shared with other jobs, torch's default of one thread per core
# spin-waits against them (the tiny encoder ran 5x and MPC planning 70x slower here without this).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# The tiny run end to end takes session 43's recipe: the gauge blanked, the prior on the forward steps of the
# labelled drives, and a round of DAgger of the prior alone (its stages: RECIPE_STAGES).
RECIPE = ("--hud", "mask_steer", "--prior-steps", "forward", "--prior-rounds", "1")
RECIPE_STAGES = pipeline.stage_names(1)


def run_pipeline(workdir, *extra, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--preset", "tiny", "--workdir", str(workdir),
                           *extra], capture_output=True, text=True, timeout=timeout, env=ENV)


def statuses(stdout: str) -> dict:
    """{stage: "ran" | "skipped"} from the pipeline's one line per stage."""
    out = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        if name in RECIPE_STAGES and rest.strip().startswith(("ran", "skipped")):
            out[name] = rest.split()[0]
    return out


# ---------------------------------------------------------------- the staleness rule
def touch(path, t):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    os.utime(path, ns=(t * 10 ** 9, t * 10 ** 9))
    return path


def test_outputs_older_than_an_input_are_stale(tmp_path):
    a, out1, out2 = touch(tmp_path / "in", 100), touch(tmp_path / "o1", 200), touch(tmp_path / "o2", 300)
    assert pipeline.stale([a], [out1, out2]) is None
    touch(a, 250)                                            # newer than o1, older than o2: still stale
    assert "in is newer than o1" in pipeline.stale([a], [out1, out2])
    assert "no o3" in pipeline.stale([a], [out1, tmp_path / "o3"])
    assert pipeline.stale([], [out1]) is None               # a collector: outputs that exist are enough
    assert "missing" in pipeline.stale([tmp_path / "gone"], [out1])


def test_a_folder_counts_as_its_newest_visible_file(tmp_path):
    data, out = tmp_path / "data", touch(tmp_path / "model", 200)
    touch(data / "ep0.npz", 100)
    touch(data / ".cache" / "latents.f32", 500)              # caches later stages write are not data
    touch(data / ".lock", 500)
    assert pipeline.stale([data], [out]) is None
    touch(data / "summary.json", 300)
    assert "data is newer than model" in pipeline.stale([data], [out])
    (tmp_path / "empty").mkdir()
    assert "missing" in pipeline.stale([tmp_path / "empty"], [out])    # a folder with no data in it yet


def plan_args(preset="tiny", hud=None, prior_steps="all", prior_rounds=0) -> Namespace:
    return Namespace(preset=preset, device="auto", seed=0, workers=None, resume=False, video="auto", hud=hud,
                     prior_steps=prior_steps, prior_rounds=prior_rounds)


@pytest.mark.parametrize("rounds", [0, 2])
def test_stages_come_in_the_seeds_order_and_write_only_under_the_workdir(tmp_path, rounds):
    built = pipeline.stages(plan_args(prior_rounds=rounds), tmp_path)
    assert [s.name for s in built] == list(pipeline.stage_names(rounds))
    assert pipeline.stage_names(0) == pipeline.STAGES
    for s in built:
        assert all(tmp_path in p.parents for p in s.outputs), s.name
        assert (s.func is not None) != (ROOT / f"{s.script or s.name}.py").exists(), s.name   # a script or a call
    made = {p for s in built for p in s.outputs}
    for i, s in enumerate(built):                            # every input is made by an earlier stage
        earlier = {p for e in built[:i] for p in e.outputs} | {p.parent for e in built[:i] for p in e.outputs}
        assert all(p in earlier for p in s.inputs), s.name
    assert tmp_path / "drive.json" in made and tmp_path / "output_dream.gif" in made


def test_the_drive_is_recorded_as_gif_where_mp4_cannot_be_written(tmp_path, monkeypatch):
    args = plan_args()
    final = lambda: pipeline.stages(args, tmp_path)[-1]                     # noqa: E731  the drive_mpc stage
    assert final().outputs[-1] == tmp_path / "drive.mp4"                    # imageio-ffmpeg is in requirements.txt
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)                # as on a machine without it
    assert final().outputs[-1] == tmp_path / "drive.gif"
    assert final().argv[final().argv.index("--record") + 1] == str(tmp_path / "drive.gif")


def test_the_round_judge_gets_the_presets_epochs_and_the_drives_count():
    for preset, spec in PRESETS.items():
        run = spec["pipeline"]
        drives, _, judge_epochs = run["onpolicy"]
        built = {s.name: s.argv for s in pipeline.stages(plan_args(preset), ROOT / "unused")}
        collect, judge = built["collect_onpolicy1"], built["train_cost_model_onpolicy1"]
        assert collect[collect.index("--episodes") + 1] == str(drives)
        assert (judge[judge.index("--epochs") + 1] == str(judge_epochs)) if judge_epochs else "--epochs" not in judge
        assert "--epochs" not in built["train_cost_model"]              # round 0's judge keeps the preset's
        # the round's drives are the planner's own, without the expert prior; the final drive uses it
        assert collect[collect.index("--prior") + 1] == "none"
        # DAgger: the finished driver, with the prior, drives training tracks of a seed no round used; the prior
        # retrained on their labelled steps goes into the last round's dagger/, the check drives the same
        # tracks with it, and the final drive uses the prior kept in the last round's folder
        dagger, retrain, check = built["collect_dagger"], built["train_prior_dagger"], built["check_prior"]
        assert dagger[dagger.index("--prior") + 1] == str(ROOT / "unused" / "models" / "prior_final.pth")
        assert dagger[dagger.index("--episodes") + 1] == str(run["dagger"])
        assert dagger[dagger.index("--seed") + 1] != collect[collect.index("--seed") + 1]
        assert dagger[dagger.index("--predictor") + 1] == str(ROOT / "unused" / "models" / "onpolicy1" /
                                                              "predictor_final.pth")
        assert retrain[retrain.index("--onpolicy-dirs") + 1] == dagger[dagger.index("--collect") + 1]
        last = ROOT / "unused" / "models" / f"onpolicy{pipeline.ONPOLICY_ROUNDS}"
        assert retrain[retrain.index("--out-dir") + 1] == str(last / "dagger")
        assert check[check.index("--prior") + 1] == str(last / "dagger" / "prior_final.pth")
        assert check[:check.index("--prior")] == dagger[:dagger.index("--prior")]          # the same tracks, models
        assert check[check.index("--collect") + 1] == str(ROOT / "unused" / "data_prior_check")
        drive = built["drive_mpc"]
        assert drive[drive.index("--prior") + 1] == str(last / "prior_final.pth")
        # the judge trained again with the DAgger drives among the MPC's own, the round's way, drives at the end;
        # the check drives with the round's judge, as the DAgger drives did
        again = built["train_cost_model_dagger"]
        own = again[again.index("--onpolicy-dirs") + 1:again.index("--onpolicy-dirs") + 3]
        assert own == [collect[collect.index("--collect") + 1], dagger[dagger.index("--collect") + 1]]
        assert again[again.index("--predictor") + 1] == dagger[dagger.index("--predictor") + 1]
        assert again[again.index("--out-dir") + 1] == str(last / "dagger")
        assert (again[again.index("--epochs") + 1] == str(judge_epochs)) if judge_epochs else "--epochs" not in again
        round_judge = str(last / "cost_model_final.pth")
        assert check[check.index("--cost") + 1] == dagger[dagger.index("--cost") + 1] == round_judge
        # the retrained judge's check: the same tracks and predictor, with the kept prior; the final drive takes
        # the judge kept after it
        judged = built["check_judge"]
        assert judged[judged.index("--cost") + 1] == str(last / "dagger" / "cost_model_final.pth")
        assert judged[judged.index("--prior") + 1] == str(last / "prior_final.pth")
        cost_at = judged.index("--cost") + 1
        same_judge = [*judged[:cost_at], round_judge, *judged[cost_at + 1:]]
        assert same_judge[:judged.index("--prior")] == dagger[:dagger.index("--prior")]   # tracks and predictor
        assert judged[judged.index("--collect") + 1] == str(ROOT / "unused" / "data_judge_check")
        assert drive[drive.index("--cost") + 1] == str(last / "cost_model_kept.pth")
        # the defaults: the encoder's own HUD mask, every labelled step, no round of the prior alone
        assert "--hud" not in built["train_encoder"] and "collect_prior_alone1" not in built
        assert retrain[retrain.index("--onpolicy-steps") + 1] == "all"


def test_the_recipe_flags_reach_the_encoder_and_every_training_of_the_prior_on_labelled_drives(tmp_path):
    built = {s.name: s for s in pipeline.stages(plan_args("small", "mask_steer", "forward", 2), tmp_path)}
    argv = {name: s.argv for name, s in built.items()}
    arg = lambda name, flag: argv[name][argv[name].index(flag) + 1]                  # noqa: E731
    assert arg("train_encoder", "--hud") == "mask_steer"
    assert all("--hud" not in a for name, a in argv.items() if name != "train_encoder")   # they read its config
    last = tmp_path / "models" / f"onpolicy{pipeline.ONPOLICY_ROUNDS}"
    dag = arg("collect_dagger", "--collect")
    priors = [arg("train_prior_dagger", "--out-dir")]
    for r in (1, 2):
        drive, train = argv[f"collect_prior_alone{r}"], argv[f"train_prior_alone{r}"]
        # round r: the prior of the round before drives alone, on training tracks no other drive used, with the
        # DAgger round's count of them; the prior is trained again on the DAgger drives and every round's so far
        assert arg(f"collect_prior_alone{r}", "--policy") == "prior"
        assert arg(f"collect_prior_alone{r}", "--prior") == str(Path(priors[-1]) / "prior_final.pth")
        assert arg(f"collect_prior_alone{r}", "--episodes") == arg("collect_dagger", "--episodes")
        assert arg(f"collect_prior_alone{r}", "--collect") == str(tmp_path / f"data_prior_alone{r}")
        seeds = [arg(s, "--seed") for s in ("collect_onpolicy1", "collect_dagger", "collect_prior_alone1",
                                            "collect_prior_alone2")]
        assert len(set(seeds)) == len(seeds)
        dirs = train[train.index("--onpolicy-dirs") + 1:train.index("--onpolicy-steps")]
        assert dirs == [dag, *(str(tmp_path / f"data_prior_alone{i}") for i in range(1, r + 1))]
        assert arg(f"train_prior_alone{r}", "--out-dir") == str(last / "dagger" / f"alone{r}")
        assert built[f"collect_prior_alone{r}"].clear == tmp_path / f"data_prior_alone{r}"
        priors.append(arg(f"train_prior_alone{r}", "--out-dir"))
    for name in ("train_prior_dagger", "train_prior_alone1", "train_prior_alone2"):
        assert arg(name, "--onpolicy-steps") == "forward", name
    # the last round's prior is the candidate the check drives with and the choice copies
    assert arg("check_prior", "--prior") == str(last / "dagger" / "alone2" / "prior_final.pth")
    assert last / "dagger" / "alone2" / "prior_final.pth" in built["choose_prior"].inputs


def test_force_names_only_stages_of_this_run(tmp_path):
    for argv in (["--force", "train_prior_alone1"], ["--force", "no_such_stage"]):
        args = pipeline.parser().parse_args(["--preset", "tiny", "--workdir", str(tmp_path / "w"), *argv])
        with pytest.raises(SystemExit, match=f"--force {argv[1]}: no such stage"):
            pipeline.main(args)
    assert not (tmp_path / "w").exists()                               # refused before anything was written


# ---------------------------------------------------------------- failures
def test_a_failing_stage_stops_the_pipeline_naming_it(tmp_path):
    for folder in ("data_race", "data_recovery", "data"):    # "collected", but without a single episode
        touch(tmp_path / folder / "summary.json", int(time.time()))
    r = run_pipeline(tmp_path, timeout=120)
    assert r.returncode != 0
    assert "stage train_encoder failed with exit code" in r.stderr
    assert str(tmp_path / "logs" / "train_encoder.log") in r.stderr
    assert (tmp_path / "logs" / "train_encoder.log").read_text().strip()
    assert statuses(r.stdout) == {"collect_race_data": "skipped", "collect_recovery_data": "skipped",
                                  "collect_data": "skipped"}


def test_a_pipeline_asked_for_an_mp4_it_cannot_write_stops_before_the_first_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)          # as where the plugin is not installed
    args = pipeline.parser().parse_args(["--preset", "tiny", "--workdir", str(tmp_path / "w"), "--video", "mp4"])
    with pytest.raises(SystemExit, match="needs imageio-ffmpeg"):
        pipeline.main(args)
    assert not (tmp_path / "w").exists()                               # nothing collected, nothing trained


# ---------------------------------------------------------------- the tiny preset end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    t0 = time.perf_counter()
    r = run_pipeline(workdir, *RECIPE)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    print(f"tiny pipeline: {time.perf_counter() - t0:.1f} s\n{r.stdout}")
    return workdir, r


def test_tiny_pipeline_writes_every_result_and_the_report(tiny_run):
    w, r = tiny_run
    assert statuses(r.stdout) == {s: "ran" for s in RECIPE_STAGES}
    drive = json.loads((w / "drive.json").read_text())
    assert len(drive["scores"]) == 1
    assert (w / "output_dream.gif").stat().st_size > 0 and (w / "drive.mp4").stat().st_size > 0
    assert list((w / "visuals").glob("reconstruct_ep*.png"))
    assert all((w / "logs" / f"{s}.log").exists() for s in (*RECIPE_STAGES, "train_decoder"))
    report = (w / "report.md").read_text()
    assert f"Score **{drive['mean']:.1f} ± {drive['std']:.1f}**" in report
    assert f"| {drive['wrong_way_share'][0]:.4g} | {drive['median_speed'][0]:.4g} |" in report
    assert "## Expert prior" in report and (w / "models" / "prior_final.pth").exists()
    for link in ("models/encoder_loss.png", "visuals/reconstruct_ep", "models/predictor_horizon.png",
                 "output_dream.gif", "drive_scores.png", "(drive.mp4)"):
        assert link in report, link
    assert (w / "drive_scores.png").exists()
    assert not (w / gate.ATTEMPTS_FILE).exists()            # tiny's drives are cut short: no gate on them
    # The on-policy rounds: the MPC's own drives, on training tracks only, and the models fine-tuned on them
    for r in range(1, pipeline.ONPOLICY_ROUNDS + 1):
        eps = sorted((w / f"data_onpolicy{r}").glob("*.npz"))
        assert len(eps) == PRESETS["tiny"]["pipeline"]["onpolicy"][0]
        for ep in eps:
            meta = read_episode(ep)[1]
            assert meta["policy"] == "OnPolicyDriver" and meta["track_seed"] >= EVAL_SEED_LIMIT
        assert (w / "models" / f"onpolicy{r}" / "cost_model_final.pth").exists()
    assert f"data_onpolicy{pipeline.ONPOLICY_ROUNDS}" in report
    # DAgger: the finished driver's drives, every step labelled with the expert's action, and the prior they taught
    eps = sorted((w / "data_dagger").glob("*.npz"))
    assert len(eps) == PRESETS["tiny"]["pipeline"]["dagger"]
    for ep in eps:
        arrays, meta = read_episode(ep)
        assert meta["policy"] == "OnPolicyDriver" and meta["track_seed"] >= EVAL_SEED_LIMIT
        assert np.isfinite(arrays["expert_action"]).all()
    last = w / "models" / f"onpolicy{pipeline.ONPOLICY_ROUNDS}"
    stats = json.loads((last / "dagger" / "prior_stats.json").read_text())
    assert stats["sources"] == ["race", "recovery", "onpolicy1"] and "data_dagger" in report
    assert f"models/onpolicy{pipeline.ONPOLICY_ROUNDS}/dagger/prior_stats.json | race + recovery + onpolicy1" in report
    # The check: the driver with the retrained prior drove the DAgger round's very tracks, and the prior kept
    # (a byte copy of one of the two) is the one whose drives scored more there
    seeds = lambda d: sorted(read_episode(p)[1]["track_seed"] for p in (w / d).glob("*.npz"))   # noqa: E731
    assert seeds("data_prior_check") == seeds("data_dagger")
    choice = json.loads((last / "prior_choice.json").read_text())
    means = {k: json.loads((w / d / "summary.json").read_text())["score_mean"]
             for k, d in (("round0", "data_dagger"), ("dagger", "data_prior_check"))}
    assert (choice["round0"], choice["dagger"]) == (means["round0"], means["dagger"])
    assert choice["kept"] == ("dagger" if means["dagger"] >= means["round0"] else "round0")
    assert (last / "prior_final.pth").read_bytes() == (w / choice["source"]).read_bytes()
    assert f"driving with **{choice['source']}**" in report
    # The round of the prior alone: its drives on training tracks of their own, every step labelled, and the prior
    # trained again with them is the one the check drove with
    alone = sorted((w / "data_prior_alone1").glob("*.npz"))
    assert len(alone) == PRESETS["tiny"]["pipeline"]["dagger"]
    assert all(np.isfinite(read_episode(p)[0]["expert_action"]).all() for p in alone)
    assert not set(seeds("data_prior_alone1")) & set(seeds("data_dagger"))
    assert min(seeds("data_prior_alone1")) >= EVAL_SEED_LIMIT
    assert f"--policy prior --prior {last / 'dagger' / 'prior_final.pth'}" in \
        (w / "logs" / "collect_prior_alone1.log").read_text()
    stats = json.loads((last / "dagger" / "alone1" / "prior_stats.json").read_text())
    assert stats["sources"] == ["race", "recovery", "onpolicy1", "onpolicy2"]
    assert f"models/onpolicy{pipeline.ONPOLICY_ROUNDS}/dagger/alone1/prior_stats.json | race + recovery + " in report
    assert f"--prior {last / 'dagger' / 'alone1' / 'prior_final.pth'}" in (w / "logs" / "check_prior.log").read_text()
    assert "| data_prior_alone1 | 2 |" in report
    assert choice["source"] in ("models/prior_final.pth", f"models/onpolicy{pipeline.ONPOLICY_ROUNDS}/dagger/alone1/"
                                                          "prior_final.pth")
    # the encoder blanked the steering gauge, and said so in its checkpoint for every later stage
    assert load_checkpoint(w / "models" / "encoder_final.pth")["config"]["hud"] == "mask_steer"
    # The judge's check: with the kept prior and the retrained judge on the same tracks; the judge kept is the
    # one whose driver scored more there (the round's: the kept prior's own mean) and the final drive's
    assert seeds("data_judge_check") == seeds("data_dagger")
    judges = json.loads((last / "judge_choice.json").read_text())
    assert judges["round"] == choice["score"]
    assert judges["dagger"] == json.loads((w / "data_judge_check" / "summary.json").read_text())["score_mean"]
    assert judges["kept"] == ("dagger" if judges["dagger"] >= judges["round"] else "round")
    assert (last / "cost_model_kept.pth").read_bytes() == (w / judges["source"]).read_bytes()
    assert f"driving with **{judges['source']}**" in report
    assert f"--cost {last / 'cost_model_kept.pth'}" in (w / "logs" / "drive_mpc.log").read_text()
    # The judge trained again with the DAgger drives among the MPC's own, reported beside the others
    judge = json.loads((last / "dagger" / "cost_model_stats.json").read_text())
    assert judge["train_transitions"] > json.loads((last / "cost_model_stats.json").read_text())["train_transitions"]
    folder = f"models/onpolicy{pipeline.ONPOLICY_ROUNDS}"
    for stats in ("models", folder, f"{folder}/dagger"):
        assert f"| {stats}/cost_model_stats.json | " in report, stats
    last = f"models/onpolicy{pipeline.ONPOLICY_ROUNDS}/predictor_probes.json"
    assert "Probes through prediction (models/predictor_probes.json)" in report and f"({last})" in report
    by_source = json.loads((w / last).read_text())["leaving_road_by_source"]
    assert by_source and "Held-out windows that leave the road" in report
    for source, r in by_source.items():                                       # a row per source, its recall first
        assert f"| {source} | {r[next(iter(r))]:.4g} |" in report


def test_a_second_run_skips_every_stage(tiny_run):
    w, _ = tiny_run
    t0 = time.perf_counter()
    r = run_pipeline(w, *RECIPE)
    assert r.returncode == 0, r.stderr
    assert statuses(r.stdout) == {s: "skipped" for s in RECIPE_STAGES}
    assert time.perf_counter() - t0 < 15
    assert "| train_encoder | skipped |" in (w / "report.md").read_text()


def test_force_reruns_the_stage_and_only_what_depends_on_it(tiny_run):
    w, _ = tiny_run
    checks = {p.name: p.stat().st_mtime_ns for p in (w / "data_prior_check").glob("*.npz")}
    drove = (w / "drive.json").stat().st_mtime_ns
    r = run_pipeline(w, *RECIPE, "--force", "train_cost_model_dagger")
    assert r.returncode == 0, r.stderr
    ran = {s for s, st in statuses(r.stdout).items() if st == "ran"}
    # The judge trained on the DAgger drives feeds only its check, its choice and the final drive: the prior's
    # check and choice, which come after it in the order, are kept, and so are their drives.
    assert ran == {"train_cost_model_dagger", "check_judge", "choose_judge", "drive_mpc"}
    assert {p.name: p.stat().st_mtime_ns for p in (w / "data_prior_check").glob("*.npz")} == checks
    assert checks and (w / "drive.json").stat().st_mtime_ns > drove                    # the drive redone


# ---------------------------------------------------------------- the prior that drives
def test_the_prior_that_drove_the_dagger_tracks_better_is_kept(tmp_path):
    last = tmp_path / "models" / "onpolicy1"
    (last / "dagger").mkdir(parents=True)
    (tmp_path / "models" / "prior_final.pth").write_bytes(b"round 0")
    (last / "dagger" / "prior_final.pth").write_bytes(b"retrained")
    inputs = [tmp_path / "data_dagger", tmp_path / "data_prior_check", tmp_path / "models" / "prior_final.pth",
              last / "dagger" / "prior_final.pth"]
    for round0, dagger, kept in ((700.0, 650.0, b"round 0"), (700.0, 700.0, b"retrained"), (600.0, 650.0, b"retrained")):
        for d, mean in (("data_dagger", round0), ("data_prior_check", dagger)):
            (tmp_path / d).mkdir(exist_ok=True)
            (tmp_path / d / "summary.json").write_text(json.dumps({"score_mean": mean}))
        line = gate.choose_prior(tmp_path, last, last / "dagger" / "prior_final.pth")
        assert (last / "prior_final.pth").read_bytes() == kept
        choice = json.loads((last / "prior_choice.json").read_text())
        assert choice == {"round0": round0, "dagger": dagger, "kept": "round0" if kept == b"round 0" else "dagger",
                          "score": max(round0, dagger),
                          "source": "models/prior_final.pth" if kept == b"round 0" else
                          "models/onpolicy1/dagger/prior_final.pth"}
        assert f"{round0:.1f}" in line and f"{dagger:.1f}" in line
        # written after its inputs, so the choice and the drive after it are up to date on the next run
        assert pipeline.stale(inputs, [last / "prior_final.pth", last / "prior_choice.json"]) is None


def test_the_judge_that_drove_the_dagger_tracks_better_with_the_kept_prior_is_kept(tmp_path):
    last = tmp_path / "models" / "onpolicy1"
    (last / "dagger").mkdir(parents=True)
    (last / "cost_model_final.pth").write_bytes(b"round's")
    (last / "dagger" / "cost_model_final.pth").write_bytes(b"retrained")
    (tmp_path / "data_judge_check").mkdir()
    # the round's judge scored the kept prior's mean (prior_choice.json's score), whichever prior that was
    for kept_prior, retrained, kept in ((700.0, 650.0, b"round's"), (700.0, 700.0, b"retrained"),
                                        (600.0, 650.0, b"retrained")):
        (last / "prior_choice.json").write_text(json.dumps({"round0": kept_prior, "dagger": kept_prior - 5,
                                                            "score": kept_prior}))
        (tmp_path / "data_judge_check" / "summary.json").write_text(json.dumps({"score_mean": retrained}))
        line = gate.choose_judge(tmp_path, last)
        assert (last / "cost_model_kept.pth").read_bytes() == kept
        choice = json.loads((last / "judge_choice.json").read_text())
        assert choice == {"round": kept_prior, "dagger": retrained, "kept": "round" if kept == b"round's" else "dagger",
                          "score": max(kept_prior, retrained),
                          "source": "models/onpolicy1/cost_model_final.pth" if kept == b"round's" else
                          "models/onpolicy1/dagger/cost_model_final.pth"}
        assert f"{kept_prior:.1f}" in line and f"{retrained:.1f}" in line
        assert (last / "cost_model_final.pth").read_bytes() == b"round's"      # the round's judge stays as it was


# ---------------------------------------------------------------- the gate on the DAgger round's tracks
def test_an_attempt_is_shelved_and_put_back_with_its_drives_of_the_prior_alone(tmp_path):
    for name in ("models", "data_dagger", "data_prior_alone1", "data_prior_alone2", "data_race", "logs"):
        touch(tmp_path / name / "x.txt", 100)
    assert gate.shelve(tmp_path, 0) == "attempt0"
    assert {p.name for p in tmp_path.iterdir()} == {"attempt0", "data_race", "logs"}     # the data stay
    assert (tmp_path / "attempt0" / "data_prior_alone2" / "x.txt").exists()
    gate.unshelve(tmp_path, "attempt0")
    assert {p.name for p in tmp_path.iterdir()} == {"models", "data_dagger", "data_prior_alone1",
                                                    "data_prior_alone2", "data_race", "logs"}
    assert (tmp_path / "data_prior_alone1" / "x.txt").stat().st_mtime_ns == 100 * 10 ** 9   # renamed, times kept


def gated_run(workdir, monkeypatch, means):
    """pipeline.main at small with every stage faked but the choices of the prior and the judge: each output
    holds the seed its stage was given, and the DAgger drives, the prior's check drives and the judge's check
    drives score the next triple of `means` (round 0's prior, the retrained one, the retrained judge with the
    kept prior). A stage given seed S takes 30 (1 + S // 1000) s: attempt k's, 30 (k + 1); the choices take none.
    Returns [(stage, seed)] run, the report's notes and the stage times it was given."""
    pairs, ran, notes, now, reported, clock = iter(means), [], [], {}, {}, [0]

    def fake_stage(stage, w, resume, grace):
        if stage.func is not None:                             # the choices of the prior and judge run for real
            ran.append((stage.name, None))
            stage.func()
            return None
        seed = stage.argv[stage.argv.index("--seed") + 1]
        ran.append((stage.name, seed))
        clock[0] += 30 * (1 + int(seed) // 1000)
        if stage.name == "collect_dagger":
            now["data_dagger"], now["data_prior_check"], now["data_judge_check"] = next(pairs)
        for out in stage.outputs:
            out.parent.mkdir(parents=True, exist_ok=True)
            mean = now.get(out.parent.name) if out.name == "summary.json" else None
            out.write_text(json.dumps({"score_mean": mean}) if mean is not None else seed)

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(pipeline, "write_report",
                        lambda w, preset, status, timings, n, *rest: (notes.extend(n), reported.update(timings)))
    pipeline.main(pipeline.parser().parse_args(["--preset", "small", "--workdir", str(workdir), "--seed", "4",
                                                "--video", "gif"]))
    return ran, notes, reported


def test_a_run_under_the_gate_trains_again_from_the_encoder_with_another_seed(tmp_path, monkeypatch):
    line, tries = PRESETS["small"]["pipeline"]["gate"]
    # attempt 0 keeps round 0's prior (its retrained one drove worse) and the retrained judge (it drove better
    # with that prior), attempt 1 the retrained prior and the round's judge
    ran, notes, _ = gated_run(tmp_path, monkeypatch, [(line - 300, line - 350, line - 250),
                                                      (line - 10, line + 50, line + 20)])
    later = pipeline.STAGES[pipeline.STAGES.index("train_encoder"):-1]
    assert pipeline.attempt_stages(pipeline.STAGES) == (*later, "drive_mpc")
    # the data are collected once; everything from the encoder to the DAgger prior twice, the drive (on the
    # evaluation tracks from 0) once; the second attempt's stages each get their first seed + 1000
    assert [s for s, _ in ran] == [*pipeline.STAGES[:-1], *later, "drive_mpc"] and ran[-1][1] == "0"
    first, second = dict(ran[:len(pipeline.STAGES) - 1]), dict(ran[len(pipeline.STAGES) - 1:-1])
    assert first["collect_race_data"] == first["train_encoder"] == "4"
    assert all(int(second[s]) == int(first[s]) + 1000 for s in later if first[s] is not None)
    assert first["check_prior"] == first["check_judge"] == first["collect_dagger"]   # the DAgger round's tracks
    assert (tmp_path / "models" / "encoder_final.pth").read_text() == "1004"
    assert (tmp_path / "attempt0" / "models" / "encoder_final.pth").read_text() == "4"
    assert (tmp_path / "attempt0" / "logs").is_dir() and (tmp_path / "data_race" / "summary.json").exists()
    attempts = json.loads((tmp_path / "attempts.json").read_text())
    assert [(a["seed"], a["score"], a["prior"], a["judge"], a["where"]) for a in attempts] == [
        (4, line - 250, "round0", "dagger", "attempt0"), (1004, line + 50, "dagger", "round", ".")]
    assert (tmp_path / "attempt0" / "data_prior_check" / "summary.json").exists()
    assert (tmp_path / "attempt0" / "data_judge_check" / "summary.json").exists()
    assert f"{line - 250:.1f} with round 0's prior and the retrained judge (attempt0/)" in notes[-1]
    assert f"{line + 50:.1f} with the retrained prior and the round's judge. Driving: attempt 1." in notes[-1]
    # each attempt's time is recorded and reported, so a gated run's whole cost shows, not only the kept one's:
    # its stages from the encoder to the choice of the judge, 30 s each in attempt 0 and 60 s in attempt 1
    timed = len([s for s in later if first[s] is not None])
    assert [a["minutes"] for a in attempts] == [timed / 2, timed]
    assert f"(seed 4, {timed / 2} min) " in notes[-1] and f"(seed 1004, {float(timed)} min) " in notes[-1]
    # a second run finds everything up to date: no stage runs, no attempt is added
    ran, _, _ = gated_run(tmp_path, monkeypatch, [])
    assert ran == [] and json.loads((tmp_path / "attempts.json").read_text()) == attempts


def test_when_no_attempt_passes_the_gate_the_best_one_drives(tmp_path, monkeypatch):
    line, tries = PRESETS["small"]["pipeline"]["gate"]
    # attempt 1's retrained judge lifts it above attempt 2, whose kept prior alone drove better than attempt 1's
    means = [(line - 300, line - 400, line - 350), (line - 200, line - 100, line - 50),
             (line - 60, line - 250, line - 150)][:tries]
    ran, notes, reported = gated_run(tmp_path, monkeypatch, means)
    assert [s for s, _ in ran].count("train_encoder") == tries and ran[-1][0] == "drive_mpc"
    # the report and timings.json give the stage times of attempt 1, which drives (60 s each), not attempt 2's
    assert reported["train_encoder"] == reported["check_judge"] == 60 and reported["collect_race_data"] == 30
    assert reported["drive_mpc"] == 30                      # the final drive, on evaluation tracks from seed 0
    assert json.loads((tmp_path / "logs" / "timings.json").read_text()) == reported
    assert (tmp_path / "models" / "encoder_final.pth").read_text() == "1004"     # attempt 1 is back in place
    assert (tmp_path / "data_dagger" / "summary.json").exists() and not (tmp_path / "attempt1").exists()
    assert (tmp_path / "attempt2" / "models" / "encoder_final.pth").read_text() == "2004"
    assert [a["where"] for a in json.loads((tmp_path / "attempts.json").read_text())] == ["attempt0", ".",
                                                                                        "attempt2"]
    assert "Driving: attempt 1." in notes[-1]


# ---------------------------------------------------------------- help text
@pytest.mark.parametrize("script", ["collect_race", "train_encoder", "train_decoder", "train_predictor", "train_prior",
                                    "train_cost_model", "visualise_dream", "drive_mpc", "benchmark", "pipeline"])
def test_help_gives_each_flags_default_once(script):
    """A flag whose help already says its default (None standing for the preset's or a derived value) must not
    get argparse's "(default: None)" after it."""
    import importlib
    from collection import collector_parser
    p = collector_parser("race", "x") if script == "collect_race" else importlib.import_module(script).parser()
    flat = " ".join(p.format_help().split())
    stated = [a for a in p._actions if a.help and "default:" in a.help]
    assert stated, "every script has a flag whose help states its default (--workers)"
    for action in stated:
        assert " ".join(action.help.split()) + " (default:" not in flat, action.option_strings
    assert "(default: 0)" in flat                          # the other flags still show theirs (--seed)
