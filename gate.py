"""Which attempt and which prior drive: pipeline.py's choices on training tracks, before the final drive.

Not a stage. After the DAgger round, choose_prior keeps round 0's prior or the one retrained on the DAgger
drives, whichever drove the DAgger round's tracks better; then, under --gate, next_attempt keeps the attempt,
shelves it in attempt{k}/ for another, or puts the best of all attempts back in place (README, "A gate on
the DAgger drives" and "Which prior drives"). The evaluation tracks are never looked at.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from presets import (DAGGER_DIR, DAGGER_MODELS, DREAM_GIF, MODELS_DIR, ONPOLICY_DIR, ONPOLICY_MODELS, ONPOLICY_ROUNDS,
                     PRIOR_CHECK_DIR, PRIOR_CHOICE, VISUALS_DIR, atomic_write)
from report import read_json

ATTEMPTS_FILE = "attempts.json"


# ---------------------------------------------------------------- the prior that drives
def last_round(w: Path) -> Path:
    """The last on-policy round's models: the final drive's predictor, judge and prior (pipeline.stages and the
    gate both read this folder from here)."""
    return w / MODELS_DIR / (f"{ONPOLICY_MODELS}{ONPOLICY_ROUNDS}" if ONPOLICY_ROUNDS else "")


PRIORS = {"round0": "round 0's prior", "dagger": "the retrained prior"}


def choose_prior(w: Path, last: Path) -> str:
    """Keep the prior whose driver scored more on the DAgger round's tracks: round 0's (the DAgger drives
    themselves) or the one retrained on them (the check drives); a tie keeps the retrained one. Copies it to
    last/prior_final.pth and writes last/prior_choice.json {"round0", "dagger", "kept", "score", "source"}.

    Why: the retrained prior moved the same run's car by -174 to +142 points a track (README, "Which prior
    drives"), and its check drives fell as far below the DAgger drives where it cost points.
    """
    means = {"round0": read_json(w / DAGGER_DIR / "summary.json")["score_mean"],
             "dagger": read_json(w / PRIOR_CHECK_DIR / "summary.json")["score_mean"]}
    kept = "dagger" if means["dagger"] >= means["round0"] else "round0"
    source = last / DAGGER_MODELS / "prior_final.pth" if kept == "dagger" else w / MODELS_DIR / "prior_final.pth"
    atomic_write(last / "prior_final.pth", lambda f: f.write(source.read_bytes()))
    choice = {**means, "kept": kept, "score": means[kept], "source": source.relative_to(w).as_posix()}
    atomic_write(last / PRIOR_CHOICE, lambda f: f.write(json.dumps(choice, indent=1).encode()))
    return (f"DAgger round's tracks: round 0's prior {means['round0']:.1f}, retrained prior {means['dagger']:.1f}; "
            f"kept {choice['source']}")


# ---------------------------------------------------------------- attempts
# What one attempt trains and drives; the collected data and the logs' timings are shared by all attempts.
ATTEMPT_PATHS = (MODELS_DIR, VISUALS_DIR, *(f"{ONPOLICY_DIR}{r}" for r in range(1, ONPOLICY_ROUNDS + 1)), DAGGER_DIR,
                 PRIOR_CHECK_DIR, DREAM_GIF)


def shelve(w: Path, k: int) -> str:
    """Move attempt k's outputs (and a copy of its logs) to w/attempt{k}/; returns that folder's name."""
    dest = w / f"attempt{k}"
    dest.mkdir(exist_ok=True)
    for name in ATTEMPT_PATHS:
        if (w / name).exists():
            shutil.move(w / name, dest / name)
    shutil.copytree(w / "logs", dest / "logs", dirs_exist_ok=True)
    return dest.name


def unshelve(w: Path, folder: str) -> None:
    """Put a shelved attempt's outputs and logs back in place (renames keep their times, so nothing reruns)."""
    src = w / folder
    for name in ATTEMPT_PATHS:
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

    attempts: [{"attempt", "seed", "score", "prior", "minutes", "where"}], where "." is the attempt in place,
    prior the one kept ("dagger" or "round0") and minutes its stages' time from the encoder to the choice of
    the prior (`seconds`). Under the line with tries left, attempt k is shelved; with none left, the best
    attempt is put in place.
    """
    choice = read_json(last_round(w) / PRIOR_CHOICE)
    rec = next((a for a in attempts if a["where"] == "."), None)
    if rec is None:
        rec = {"attempt": k, "seed": seed, "where": "."}
        attempts.append(rec)
    rec.update(score=choice["score"], prior=choice["kept"], minutes=round(seconds / 60, 1))
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
    """One line for the report: every attempt's mean, prior and time, and which one drives."""
    kept = next(a for a in attempts if a["where"] == ".")
    each = "; ".join(f"attempt {a['attempt']} (seed {a['seed']}, {a.get('minutes', '-')} min) {score(a):.1f}"
                     + (f" with {PRIORS[a['prior']]}" if "prior" in a else "")
                     + ("" if a["where"] == "." else f" ({a['where']}/)") for a in attempts)
    return [f"Mean on the DAgger round's tracks against the line {line:.0f}: {each}. "
            f"Driving: attempt {kept['attempt']}."]
