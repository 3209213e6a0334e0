"""report.md of a pipeline.py work directory: what the stages left on disk, in tables and figures.

Not a stage: pipeline.py calls write_report() after its stages. A section whose files are missing (a stage
that has not run, or failed) is left out.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from presets import (DAGGER_DIR, DAGGER_MODELS, DATA_DIRS, JUDGE_CHECK_DIR, JUDGE_CHOICE, JUDGE_KEPT, MODELS_DIR,
                     ONPOLICY_DIR, PRIOR_ALONE_DIR, PRIOR_ALONE_MODELS, PRIOR_CHECK_DIR, PRIOR_CHOICE, VISUALS_DIR,
                     onpolicy_rounds)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _last_line(path: Path):
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)     # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(x) for x in row) + " |" for row in rows), ""]


def _figure(w: Path, path: Path, alt: str) -> list[str]:
    return [f"![{alt}]({path.relative_to(w).as_posix()})", ""] if path.exists() else []


def plot_scores(drive: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(drive["scores"]) + 2), 3.5))
    colours = ["tab:green" if lap else "tab:blue" for lap in drive["lap_finished"]]
    ax.bar([str(s) for s in drive["seeds"]], drive["scores"], color=colours)
    ax.axhline(drive["mean"], color="gray", ls="--", label=f"mean {drive['mean']:.1f}")
    ax.set_xlabel("track seed (green: lap finished)"), ax.set_ylabel("score"), ax.legend()
    ax.set_title("MPC drive scores on unseen tracks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(w: Path, preset: str, status: dict, timings: dict, notes: list[str],
                 extra_folders: list[str], cut: int | None) -> None:
    """w/report.md. status: {stage: "ran" | "skipped"} in the pipeline's order; extra_folders: the data
    folders after the three sources (on-policy rounds, DAgger); cut: the control steps each drive was
    stopped at (None: whole drives)."""
    m, v = w / MODELS_DIR, w / VISUALS_DIR
    out = [f"# TinyAutoJEPA pipeline, preset `{preset}`", "", *(f"> {n}\n" for n in notes),
           "## Stages", "", *_table(["stage", "this run", "wall time of its last run (s)"],
                                    [[s, done, timings.get(s, "-")] for s, done in status.items()])]
    folders = [*DATA_DIRS.items(), *((d, d) for d in extra_folders)]
    rows = [[src, s["episodes"], s["frames"], f"{s['score_mean']} ± {s['score_std']}", s["laps_finished"],
             s["off_road_share"], s["median_speed"], s.get("recovered_within_3s", "-")]
            for src, d in folders if (s := read_json(w / d / "summary.json"))]
    if rows:
        out += ["## Data", "", f"{ONPOLICY_DIR}{{r}}: the MPC's own drives on training tracks, round r; {DAGGER_DIR}: "
                f"the finished driver's, labelled by the expert for the prior; {PRIOR_ALONE_DIR}{{r}}: the prior's "
                f"own without the planner, round r (--prior-rounds); {PRIOR_CHECK_DIR}: the DAgger round's tracks "
                f"driven with the prior retrained on them; {JUDGE_CHECK_DIR}: with the kept prior and the judge "
                "trained again with them.", "",
                *_table(["source", "episodes", "frames", "score", "laps", "off-road share", "median speed",
                         "mistakes recovered in 3 s"], rows)]
    out += ["## Encoder", "", *_figure(w, m / "encoder_loss.png", "encoder loss")]
    if probes := read_json(m / "encoder_probes.json"):
        out += ["Linear probes on held-out episodes:", "", *_table(["probe", "value"], list(probes.items()))]
    recon = sorted(v.glob("reconstruct_ep*.png"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    dec = _last_line(v / "decoder_stats.jsonl")
    if recon or dec:
        out += ["## Decoder (reconstruction from frozen latents)", ""]
        if dec:
            out += [f"Held-out PSNR after encoder epoch {dec['encoder_epoch']}: **{dec['psnr_db']} dB**.", ""]
        out += _figure(w, recon[-1], "reconstructions") if recon else []
    out += ["## Predictor", "", *_figure(w, m / "predictor_horizon.png", "prediction error vs horizon")]
    if pred := _last_line(m / "predictor_stats.jsonl"):
        keys = sorted({k for r in pred["val"].values() for k in r if k.startswith("ratio@")}, key=lambda k: int(k[6:]))
        out += [f"Held-out error / copy-baseline error, epoch {pred['epoch']}:", "",
                *_table(["source", *keys], [[s, *(r.get(k, "-") for k in keys)] for s, r in pred["val"].items()])]
    # Round 0's predictor, and the last on-policy round's: it has seen the planner's own drives.
    last = onpolicy_rounds(m, "predictor_probes.json")[-1:]
    for path in [m / "predictor_probes.json", *(d / "predictor_probes.json" for d in last)]:
        if probes := read_json(path):
            by_source = probes.pop("leaving_road_by_source", {})
            out += [f"Probes through prediction ({path.relative_to(w).as_posix()}):", "",
                    *_table(["probe", "value"], list(probes.items()))]
            keys = list(dict.fromkeys(k for r in by_source.values() for k in r))
            out += ["Held-out windows that leave the road (on it now, off it h steps later): the share the on-road "
                    "probe sees leave, from the dream and from the true latent, per source:", "",
                    *_table(["source", *keys], [[s, *(r.get(k, "-") for k in keys)] for s, r in by_source.items()])
                    ] if by_source else []
    if (w / "output_dream.gif").exists():
        out += ["## Dreams", "", "Real future | dreams under the real actions, hard left, full throttle, hard right:",
                "", *_figure(w, w / "output_dream.gif", "dream")]
    # Every judge: round 0's, each on-policy round's, and the one trained again with the DAgger drives.
    rounds = onpolicy_rounds(m)
    judges = [m / "cost_model_stats.json", *(d / "cost_model_stats.json" for d in rounds),
              *(d / DAGGER_MODELS / "cost_model_stats.json" for d in rounds[-1:])]
    if rows := [[p.relative_to(w).as_posix(), v["expert_auc"], v["expert_calibration"]["ece"], v["road_accuracy"],
                 v["progress_r2"]] for p in judges if (v := (read_json(p) or {}).get("val"))]:
        out += ["## Cost model (held-out)", "", *_table(
            ["stats", "expert AUC", "expert ECE", "on-road accuracy", "progress R²"], rows)]
    retrained = f"{DAGGER_MODELS}/prior_stats.json"
    alone = [p for d in onpolicy_rounds(m)[-1:]
             for p in (d / DAGGER_MODELS).glob(f"{PRIOR_ALONE_MODELS}*/prior_stats.json")]
    priors = [(p.relative_to(w).as_posix(), st) for p in [m / "prior_stats.json",
              *(d / retrained for d in onpolicy_rounds(m, retrained)[-1:]),
              *sorted(alone, key=lambda p: int(p.parent.name[len(PRIOR_ALONE_MODELS):]))] if (st := read_json(p))]
    if priors:
        out += ["## Expert prior (held-out steps: the expert's, and the labelled DAgger drives' where used)", "",
                *_table(["stats", "sources", "steer R²", "longitudinal R²", "training steps"],
                        [[path, " + ".join(st["sources"]), st["val"]["steer_r2"], st["val"]["longitudinal_r2"],
                          st["train_steps"]] for path, st in priors])]
    for d in onpolicy_rounds(m, PRIOR_CHOICE)[-1:]:
        c = read_json(d / PRIOR_CHOICE)
        out += [f"On the DAgger round's tracks the driver scored {c['round0']:.1f} with round 0's prior and "
                f"{c['dagger']:.1f} with the one retrained on them: driving with **{c['source']}** "
                f"(copied to {(d / 'prior_final.pth').relative_to(w).as_posix()}).", ""]
    for d in onpolicy_rounds(m, JUDGE_CHOICE)[-1:]:
        c = read_json(d / JUDGE_CHOICE)
        out += [f"With that prior it scored {c['round']:.1f} there with the round's judge and {c['dagger']:.1f} "
                f"with the one trained again with the DAgger drives: driving with **{c['source']}** "
                f"(copied to {(d / JUDGE_KEPT).relative_to(w).as_posix()}).", ""]
    if drive := read_json(w / "drive.json"):
        plot_scores(drive, w / "drive_scores.png")
        out += ["## Drive (MPC on unseen tracks)", "",
                f"Score **{drive['mean']:.1f} ± {drive['std']:.1f}** over {len(drive['scores'])} track(s); "
                f"laps finished {sum(drive['lap_finished'])}/{len(drive['scores'])}; planning "
                f"{drive.get('plan_ms_median', '-')} ms median, {drive.get('plan_ms_p95', '-')} ms p95."
                + (f" Each drive was stopped after {cut} control steps, so these scores are partial." if cut else ""),
                "",
                *_table(["track seed", "score", "tiles fraction", "lap finished", "off-road share",
                         "wrong-way share", "median speed"],
                        [list(r) for r in zip(drive["seeds"], drive["scores"], drive["tiles_fraction"],
                                              drive["lap_finished"],
                                              *(drive.get(k, ["-"] * len(drive["seeds"]))
                                                for k in ("off_road_share", "wrong_way_share", "median_speed")))]),
                *_figure(w, w / "drive_scores.png", "drive scores")]
        out += [f"[Video of the first drive]({v})" for v in ("drive.mp4", "drive.gif") if (w / v).exists()][:1]
        out += [""]
    (w / "report.md").write_text("\n".join(out))
