"""``cairn checkpoint plot``: loss (or any metric) curves of runs from their metrics.jsonl,
with every checkpoint save and every resume marked."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from cairn.checkpoint.cli.output import EXIT_OK, KIND_NAMES
from cairn.checkpoint.errors import UsageError
from cairn.checkpoint.fsio import display_path


@dataclasses.dataclass
class Run:
    label: str
    points: dict[int, float]  # step -> value (a step re-run after a resume: the later value)
    saves: list[tuple[int, str]]  # (step, kind)
    resumes: list[int]  # steps a run resumed from


def load_run(path: Path, metric: str) -> Run:
    """A run's ``metric`` per step, its checkpoint saves and resumes, from its metrics.jsonl."""
    file = path if path.is_file() else path / "metrics.jsonl"
    if not path.exists():
        raise UsageError("no such run directory", path)
    if not file.is_file():
        raise UsageError("no metrics.jsonl here (a run's --job.dump_folder holds one)", path)
    points: dict[int, float] = {}
    saves, resumes = [], []
    last_step = None
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"line {number} of metrics.jsonl is not JSON", file) from None
        event, step = record.get("event"), record.get("step")
        if not isinstance(step, int):
            continue
        if event == "checkpoint_save":
            saves.append((step, str(record.get("kind", "full"))))
        elif event == "checkpoint_load" and record.get("kind") == "full":  # a resume, not a fresh start
            resumes.append(step)
        elif event is None and isinstance(record.get(metric), (int, float)):
            if last_step is not None and step <= last_step and resumes[-1:] != [step - 1]:
                resumes.append(step - 1)  # re-run steps: a resume from a checkpoint older than the crash
            points[step] = float(record[metric])
            last_step = step
    if not points:
        raise UsageError(f"no {metric!r} values in metrics.jsonl", file)
    return Run(str(path), points, saves, sorted(set(resumes)))


def _labels(paths: list[Path]) -> list[str]:
    """Run dir names; more of the path where two runs share a name."""
    for depth in range(1, 6):
        labels = ["/".join(p.resolve().parts[-depth:]) if p.is_dir() else
                  "/".join(p.resolve().parent.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def plot_runs(runs: list[Run], out: Path, metric: str, title: str | None = None) -> None:
    matplotlib.use("Agg")

    line_styles = ["-", "--", "-.", ":"]
    markers = {"full": "o", "model_only": "s", "hf": "D", "seed": "^"}
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    try:
        for i, run in enumerate(runs):
            steps = sorted(run.points)
            (line,) = ax.plot(steps, [run.points[s] for s in steps], line_styles[i % len(line_styles)],
                              linewidth=2.2 if i == 0 else 1.4, alpha=0.9, label=run.label)
            color = line.get_color()
            for kind in sorted({kind for _, kind in run.saves}):
                marked = [s for s, k in run.saves if k == kind and s in run.points]
                ax.plot(marked, [run.points[s] for s in marked], linestyle="none", marker=markers.get(kind, "o"),
                        markersize=7, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.5)
            for step, _ in run.saves:  # ticks along the bottom: every save, also those off the curve
                ax.axvline(step, ymin=0, ymax=0.035, color=color, linewidth=1.5)
            for step in run.resumes:
                ax.axvline(step, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
        handles, _ = ax.get_legend_handles_labels()
        kinds = sorted({kind for run in runs for _, kind in run.saves})
        handles += [Line2D([], [], linestyle="none", marker=markers.get(kind, "o"), markerfacecolor="none",
                           markeredgecolor="0.3", label=f"{KIND_NAMES.get(kind, kind)} checkpoint saved")
                    for kind in kinds]
        if any(run.resumes for run in runs):
            handles.append(Line2D([], [], color="0.3", linestyle=":", label="resumed from a checkpoint"))
        ax.legend(handles=handles, fontsize=8, loc="best")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} per step")
        ax.grid(alpha=0.25)
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)


def cmd_plot(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.run_dirs]
    runs = [load_run(path, args.metric) for path in paths]
    for run, label in zip(runs, _labels(paths)):
        run.label = label
    out = Path(args.output)
    if not out.parent.exists():
        raise UsageError("the output's folder does not exist", out)
    plot_runs(runs, out, args.metric, args.title)
    saves = sum(len(run.saves) for run in runs)
    print(f"wrote {display_path(out)}: {len(runs)} run(s), {sum(len(r.points) for r in runs)} points, "
          f"{saves} checkpoint save(s) marked")
    return EXIT_OK
