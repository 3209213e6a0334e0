"""Which attempt, prior and judge drive: pipeline.py's choices on training tracks, before the final drive.

Not a stage. After the DAgger round, choose_prior keeps round 0's prior or the one retrained on the DAgger
drives, whichever drove the DAgger round's tracks better, and choose_judge then keeps the round's judge or the
one trained again with the DAgger drives, the same way; under --gate, next_attempt keeps the attempt, shelves
it in attempt{k}/ for another, or puts the best of all attempts back in place (README, "A gate on the DAgger
drives", "Which prior drives" and "Which judge drives"). The evaluation tracks are never looked at.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from presets import (DAGGER_DIR, DAGGER_MODELS, DREAM_GIF, JUDGE_CHECK_DIR, JUDGE_CHOICE, JUDGE_KEPT, MODELS_DIR,
                     ONPOLICY_DIR, ONPOLICY_MODELS, ONPOLICY_ROUNDS, PRIOR_ALONE_DIR, PRIOR_CHECK_DIR, PRIOR_CHOICE,
                     VISUALS_DIR, atomic_write)
from report import read_json

ATTEMPTS_FILE = "attempts.json"


# ---------------------------------------------------------------- the prior that drives
def last_round(w: Path) -> Path:
    """The last on-policy round's models: the final drive's predictor, judge and prior (pipeline.stages and the
    gate both read this folder from here)."""
    return w / MODELS_DIR / (f"{ONPOLICY_MODELS}{ONPOLICY_ROUNDS}" if ONPOLICY_ROUNDS else "")


PRIORS = {"round0": "round 0's prior", "dagger": "the retrained prior"}
JUDGES = {"round": "the round's judge", "dagger": "the retrained judge"}


def _keep(w: Path, means: dict[str, float], sources: dict[str, Path], dest: Path, record: Path) -> dict:
    """Copy the source of the model whose driver scored more to dest (means and sources: {name: ...}, the
    model before first and the retrained one second; a tie keeps the retrained one) and write record
    {**means, "kept", "score", "source"}; returns that dict."""
    before, retrained = means
    kept = retrained if means[retrained] >= means[before] else before
    atomic_write(dest, lambda f: f.write(sources[kept].read_bytes()))
    choice = {**means, "kept": kept, "score": means[kept], "source": sources[kept].relative_to(w).as_posix()}
    atomic_write(record, lambda f: f.write(json.dumps(choice, indent=1).encode()))
    return choice


def choose_prior(w: Path, last: Path, retrained: Path) -> str:
    """Keep the prior whose driver scored more on the DAgger round's tracks: round 0's (the DAgger drives
    themselves) or `retrained`, the one retrained on them (the check drives; last/dagger/'s, or under pipeline.py
    --prior-rounds the last round's of the prior alone). Copies it to last/prior_final.pth and writes
    last/prior_choice.json {"round0", "dagger", "kept", "score", "source"}.

    Why: the retrained prior moved the same run's car by -174 to +142 points a track (README, "Which prior
    drives"), and its check drives fell as far below the DAgger drives where it cost points.
    """
    means = {"round0": read_json(w / DAGGER_DIR / "summary.json")["score_mean"],
             "dagger": read_json(w / PRIOR_CHECK_DIR / "summary.json")["score_mean"]}
    sources = {"round0": w / MODELS_DIR / "prior_final.pth", "dagger": retrained}
    c = _keep(w, means, sources, last / "prior_final.pth", last / PRIOR_CHOICE)
    return (f"DAgger round's tracks: round 0's prior {means['round0']:.1f}, retrained prior {means['dagger']:.1f}; "
            f"kept {c['source']}")


def choose_judge(w: Path, last: Path) -> str:
    """Keep the judge whose driver, with the kept prior, scored more on the DAgger round's tracks: the round's
    (the kept prior's drives there) or the one trained again with the DAgger drives (the judge's check drives).
    Copies it to last/JUDGE_KEPT and writes last/judge_choice.json {"round", "dagger", "kept", "score",
    "source"}.

    Why: the retrained judge moved five runs' cars by +66 to +97, +4, -232, -393 and +36 points a track over 0-99
    (README, "Which judge drives"). Only a large gap on these 32 tracks is more than noise.
    """
    means = {"round": read_json(last / PRIOR_CHOICE)["score"],
             "dagger": read_json(w / JUDGE_CHECK_DIR / "summary.json")["score_mean"]}
    sources = {"round": last / "cost_model_final.pth", "dagger": last / DAGGER_MODELS / "cost_model_final.pth"}
    c = _keep(w, means, sources, last / JUDGE_KEPT, last / JUDGE_CHOICE)
    return (f"DAgger round's tracks with the kept prior: the round's judge {means['round']:.1f}, retrained judge "
            f"{means['dagger']:.1f}; kept {c['source']}")


# ---------------------------------------------------------------- attempts
# What one attempt trains and drives; the collected data and the logs' timings are shared by all attempts.
ATTEMPT_PATHS = (MODELS_DIR, VISUALS_DIR, *(f"{ONPOLICY_DIR}{r}" for r in range(1, ONPOLICY_ROUNDS + 1)), DAGGER_DIR,
                 PRIOR_CHECK_DIR, JUDGE_CHECK_DIR, DREAM_GIF)


def attempt_paths(w: Path) -> list[str]:
    """What of w one attempt made: ATTEMPT_PATHS and its drives of the prior alone (pipeline.py --prior-rounds)."""
    return [*ATTEMPT_PATHS, *sorted(p.name for p in w.glob(f"{PRIOR_ALONE_DIR}*"))]


def shelve(w: Path, k: int) -> str:
    """Move attempt k's outputs (and a copy of its logs) to w/attempt{k}/; returns that folder's name."""
    dest = w / f"attempt{k}"
    dest.mkdir(exist_ok=True)
    for name in attempt_paths(w):
        if (w / name).exists():
            shutil.move(w / name, dest / name)
    shutil.copytree(w / "logs", dest / "logs", dirs_exist_ok=True)
    return dest.name


def unshelve(w: Path, folder: str) -> None:
    """Put a shelved attempt's outputs and logs back in place (renames keep their times, so nothing reruns)."""
    src = w / folder
    for name in attempt_paths(src):
        if (src / name).exists():
            shutil.move(src / name, w / name)
    shutil.copytree(src / "logs", w / "logs", dirs_exist_ok=True)
    shutil.rmtree(src)


def score(attempt: dict) -> float:
    """An attempt's mean on the DAgger round's tracks; attempts.json of runs before the prior check: the DAgger
    drives' mean."""
    return attempt.get("score", attempt.get("dagger_score"))


def next_attempt(w: Path, attempts: list[dict], k: int, seed: int, line: float, tries: int,
                 seconds: float) -> bool:
    """Record attempt k (its kept driver's mean on the DAgger round's tracks) and act on the gate: True when
    another attempt must run.

    attempts: [{"attempt", "seed", "score", "prior", "judge", "minutes", "where"}], where "." is the attempt in
    place, score the mean of the driver that drives (choose_judge's), prior and judge those kept ("round0" or
    "dagger", "round" or "dagger") and minutes its stages' time from the encoder to the choice of the judge
    (`seconds`). Under the line with tries left, attempt k is shelved; with none left, the best
    attempt is put in place.
    """
    prior, judge = (read_json(last_round(w) / f) for f in (PRIOR_CHOICE, JUDGE_CHOICE))
    rec = next((a for a in attempts if a["where"] == "."), None)
    if rec is None:
        rec = {"attempt": k, "seed": seed, "where": "."}
        attempts.append(rec)
    rec.update(score=judge["score"], prior=prior["kept"], judge=judge["kept"], minutes=round(seconds / 60, 1))
    passed = score(rec) >= line
    print(f"attempt {k} (seed {seed}): {score(rec):.1f} on the DAgger round's tracks, "
          f"{'at or over' if passed else 'under'} the line {line:.0f}", flush=True)
    if not passed and len(attempts) < tries:
        rec["where"] = shelve(w, k)
    elif not passed and (best := max(attempts, key=score)) is not rec:
        rec["where"] = shelve(w, k)
        unshelve(w, best["where"])
        best["where"] = "."
    atomic_write(w / ATTEMPTS_FILE, lambda f: f.write(json.dumps(attempts, indent=1).encode()))
    return not passed and len(attempts) < tries


def attempt_notes(attempts: list[dict], line: float) -> list[str]:
    """One line for the report: every attempt's mean, prior, judge and time, and which one drives."""
    kept = next(a for a in attempts if a["where"] == ".")
    each = "; ".join(f"attempt {a['attempt']} (seed {a['seed']}, {a.get('minutes', '-')} min) {score(a):.1f}"
                     + (f" with {PRIORS[a['prior']]}" if "prior" in a else "")
                     + (f" and {JUDGES[a['judge']]}" if "judge" in a else "")
                     + ("" if a["where"] == "." else f" ({a['where']}/)") for a in attempts)
    return [f"Mean on the DAgger round's tracks against the line {line:.0f}: {each}. "
            f"Driving: attempt {kept['attempt']}."]
