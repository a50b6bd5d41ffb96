"""Tables and plots of a sweep's records (``mu_fast.sweep.load_results``), in the paper's layout.

Records are grouped into one table per (model, task). Rows are a method plus the grid values that vary within the
table (``flu lr=0.001``) and, for a sequential run's records, the step (``paper:flu step=3``: after 4 partitions); each cell is the mean ± sample standard deviation over seeds (``n`` seeds, no ± for one).
The title says how many seeds; where rows have different numbers of seeds (a damaged store, a sweep still running)
an ``n`` column gives each row's, and a cell over fewer records than its row says ``(n=k)``: no number claims more
seeds than it has. Records whose config lacks the model, task or method are left out with a warning.
Columns (``COLUMNS``): forget error, maintain accuracy, Q/A forget error, MCQ forget error, relearned accuracy,
latent-probe accuracy of the true answer; the ``(before edit)`` row is the unedited model. ``format_table`` gives
plain text at most 100 columns wide, ``rich_tables`` rich Tables.

Plots (matplotlib, Agg backend): ``plot_robustness`` (bars per method with ± error bars and dashed before-edit
references, named in the legend beside the axes), ``plot_tradeoff`` (forget error vs maintain accuracy, one line per
method across the grid, each point labelled with its lr) and ``plot_metric_vs_lr`` (a metric against the learning
rate, one line per method); in both line plots a method whose points are exactly another's is drawn dashed with
hollow markers and named ``random_mlps (= flu)``, as the table's notes name it. ``write_report`` writes
``table.txt`` and the three plots of every table into a folder.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mu_fast.stats import mean_std

COLUMNS: tuple[tuple[str, str], ...] = (
    ("forget_err", "forget err"),
    ("maintain_acc", "maintain"),
    ("qa_forget_err", "Q/A err"),
    ("mcq_forget_err", "MCQ err"),
    ("relearn_acc", "relearned"),
    ("probe_true_acc", "probe"),
)
BEFORE = "(before edit)"
WIDTH = 100
# What the CLI prints under the tables (mu-fast report), as the demo's table has its legend.
COLUMN_LEGEND: dict[str, str] = {
    "forget err": "1 - accuracy of the true answer on the edited (forget) facts, training format (higher: forgotten)",
    "maintain": "accuracy on the maintain facts (must not change)",
    "Q/A err": "1 - true-answer accuracy on the forget facts in the question/answer format",
    "MCQ err": "1 - multiple-choice accuracy on the forget facts",
    "relearned": "held-out forget accuracy after the LoRA relearning attack (lower: more robust)",
    "probe": "best latent-probe accuracy of the true answer after the embeddings (lower: more robust)",
    "a±b": "mean ± sample std over the seeds; (before edit): the unedited model",
}


def metrics_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's summary numbers plus ``qa_forget_err`` (1 - Q/A accuracy on the forget facts) where scored."""
    out = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
    qa = ((record.get("results") or {}).get("evals") or {}).get("qa", {}).get("forget", {}).get("acc")
    if isinstance(qa, (int, float)):
        out["qa_forget_err"] = 1.0 - float(qa)
    return out


def _task_label(task: Mapping[str, Any]) -> str:
    if task.get("dataset") == "memory":  # a task a caller provided (mu_fast.sweep.provided): its name and digest
        return f"memory:{task['name']}:{task['digest'][:8]}"
    return f"{task['dataset']}:{task['forget_split']}:{task['inject_label']}"


def _records(records_or_path: Iterable[Mapping[str, Any]] | str | os.PathLike) -> list[Mapping[str, Any]]:
    if isinstance(records_or_path, (str, os.PathLike)):
        from mu_fast.sweep.store import load_results

        return load_results(records_or_path)
    return [r for r in records_or_path if r.get("status", "ok") == "ok"]


def tables(records: Iterable[Mapping[str, Any]] | str | os.PathLike) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(model, task): {"rows": {label: {metric: [values over seeds]}}, "before": {metric: [values]},
    "axes": {label: {axis: value}}, "methods": {label: method}, "seeds": {label: [seed of each record]}}}``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    left_out = []
    for r in _records(records):
        if _placeable(r.get("config")):
            grouped[(r["config"]["model"]["ref"], _task_label(r["config"]["task"]))].append(r)
        else:
            left_out.append(str(r.get("run_id", "?")))
    if left_out:
        warnings.warn(f"report: left out {len(left_out)} record(s) whose config lacks its model, task or method "
                      f"(run ids {', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''})", stacklevel=2)
    for key, recs in grouped.items():
        varying = sorted({a for r in recs for a in r["config"].get("axes", {})})
        table: dict[str, Any] = {"rows": {}, "before": defaultdict(list), "axes": {}, "methods": {}, "selections": {},
                                 "seeds": defaultdict(list)}
        for r in recs:
            components = (r.get("localization") or {}).get("components")
            if components is not None and r["config"].get("seed") == min(x["config"].get("seed", 0) for x in recs):
                table["selections"].setdefault(r["config"]["method"], {"localization": {"components": components}})
            axes = {a: r["config"].get("axes", {}).get(a) for a in varying}
            label = " ".join([r["config"]["method"], *(f"{a}={_short(v)}" for a, v in axes.items() if v is not None),
                              *([f"step={r['config']['step']}"] if r["config"].get("step") is not None else [])])
            row = table["rows"].setdefault(label, defaultdict(list))
            table["axes"][label], table["methods"][label] = axes, r["config"]["method"]
            table["seeds"][label].append(r["config"].get("seed"))
            for metric, value in metrics_of(r).items():
                row[metric].append(value)
            before = dict(r.get("before") or {})
            if "forget_err" in before:
                for metric, value in before.items():
                    table["before"][metric].append(value)
        out[key] = table
    return out


def _placeable(config: Any) -> bool:
    """Whether a record's config names what places it in a table: model ref, task and method."""
    if not isinstance(config, Mapping) or not isinstance(config.get("method"), str):
        return False
    model, task = config.get("model"), config.get("task")
    keys = ("name", "digest") if isinstance(task, Mapping) and task.get("dataset") == "memory" else \
        ("dataset", "forget_split", "inject_label")
    return isinstance(model, Mapping) and "ref" in model and isinstance(task, Mapping) and all(k in task for k in keys)


def seed_counts(table: Mapping[str, Any]) -> dict[str, int]:
    """The number of distinct seeds of each row of a table (``tables``)."""
    return {label: len(set(seeds)) for label, seeds in table["seeds"].items()}


def _seed_title(counts: Mapping[str, int]) -> str:
    values = set(counts.values())
    if len(values) == 1:
        n = values.pop()
        return f"mean±std over {n} seed{'s' * (n != 1)}"
    return f"mean±std over {min(values)}–{max(values)} seeds (n: per row)"


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(values: Sequence[float] | None, records: int = 0) -> str:
    """mean±std of ``values``; ``(n=k)`` when fewer than the row's ``records`` have the metric."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    text = f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"
    return text + (f" (n={len(values)})" if len(values) < records else "")


def format_table(records: Iterable[Mapping[str, Any]] | str | os.PathLike, width: int = WIDTH) -> str:
    """Every table as plain text at most ``width`` columns wide (labels are cut with … when they would not fit)."""
    blocks = []
    for (model, task), table in tables(records).items():
        columns = [(k, h) for k, h in COLUMNS if any(k in row for row in table["rows"].values())]
        counts = seed_counts(table)
        cells = {label: [_cell(row.get(k), len(table["seeds"][label])) for k, _ in columns]
                 for label, row in table["rows"].items()}
        if len(set(counts.values())) > 1:  # rows differ: each row says its own number of seeds
            columns = [("n", "n"), *columns]
            cells = {label: [str(counts[label]), *row] for label, row in cells.items()}
        if table["before"]:
            cells = {BEFORE: [_cell(table["before"].get(k)[:1] if table["before"].get(k) else None)
                              if k != "n" else "" for k, _ in columns], **cells}
        col_width = [max(len(h), *(len(c[i]) for c in cells.values())) for i, (_, h) in enumerate(columns)]
        label_width = min(max(len("method"), *(len(x) for x in cells)), max(12, width - sum(w + 2 for w in col_width)))
        title = f"{model} · {task} · {_seed_title(counts)}"
        heading = [title] if len(title) <= width else [f"{model} · {task}"[:width], _seed_title(counts)]
        header = "method".ljust(label_width) + "".join(f"  {h:>{w}}" for (_, h), w in zip(columns, col_width))
        lines = [*heading, header]
        lines.append("-" * min(width, len(lines[-1])))
        for label, row in cells.items():
            name = label if len(label) <= label_width else label[: label_width - 1] + "…"
            lines.append(name.ljust(label_width) + "".join(f"  {c:>{w}}" for c, w in zip(row, col_width)))
        lines += _notes(table, width) + _repeated_seed_notes(table, width)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no ok records"


def _notes(table: Mapping[str, Any], width: int) -> list[str]:
    """``mu_fast.aggregate.same_selection_notes`` for the table's methods (first seed), wrapped to ``width``."""
    import textwrap

    from mu_fast.aggregate import same_selection_notes

    notes = same_selection_notes(table["selections"]) if table["selections"] else []
    return [line for note in notes for line in textwrap.wrap(f"note: {note}", width)]


def _repeated_seed_notes(table: Mapping[str, Any], width: int) -> list[str]:
    """Rows holding several records of one seed (runs that differ outside the table's columns) say so."""
    import textwrap

    out = []
    for label, seeds in table["seeds"].items():
        if len(seeds) > len(set(seeds)):
            note = (f"note: {label} averages {len(seeds)} records of {len(set(seeds))} seed(s): runs that differ in "
                    "settings the table does not show")
            out += textwrap.wrap(note, width)
    return out


def rich_tables(records: Iterable[Mapping[str, Any]] | str | os.PathLike) -> list[Any]:
    """The same tables as ``rich.table.Table`` objects."""
    from rich.table import Table

    out = []
    for (model, task), table in tables(records).items():
        columns = [(k, h) for k, h in COLUMNS if any(k in row for row in table["rows"].values())]
        counts = seed_counts(table)
        varying = len(set(counts.values())) > 1
        t = Table(title=f"{model} · {task} · {_seed_title(counts)}", title_justify="left")
        t.add_column("method", style="bold")
        if varying:
            t.add_column("n", justify="right")
        for _, header in columns:
            t.add_column(header, justify="right")
        if table["before"]:
            t.add_row(BEFORE, *([""] if varying else []), *(_cell(table["before"].get(k, [])[:1]) for k, _ in columns),
                      style="dim")
        for label, row in table["rows"].items():
            t.add_row(label, *([str(counts[label])] if varying else []),
                      *(_cell(row.get(k), len(table["seeds"][label])) for k, _ in columns))
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROBUSTNESS = (("forget_err", "forget err"), ("mcq_forget_err", "MCQ err"), ("relearn_acc", "relearned acc"),
              ("probe_true_acc", "probe acc"))


def plot_robustness(table: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars (metric per method row, mean ± std over seeds); dashed lines: the unedited model's forget error,
    MCQ error and true-answer accuracy (what relearning would restore), named in the legend, which sits beside the
    axes (never over the bars)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    metrics = [(k, h) for k, h in ROBUSTNESS if any(k in row for row in table["rows"].values())]
    labels = list(table["rows"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(len(metrics), 1) / 2 + 3), 4.2))
    width = 0.8 / max(len(metrics), 1)
    dashed = False
    for j, (key, header) in enumerate(metrics):
        stats = [mean_std(table["rows"][label].get(key, [])) for label in labels]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, [m for m, _ in stats], width, yerr=[s or 0.0 for _, s in stats], capsize=3, label=header)
        before = table["before"].get("forget_err" if key != "mcq_forget_err" else "mcq_forget_err")
        if before and key in ("forget_err", "mcq_forget_err", "relearn_acc"):
            ref = before[0] if key != "relearn_acc" else 1.0 - before[0]
            ax.axhline(ref, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
            dashed = True
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over seeds (± std)")
    ax.set_title(title or "robustness per method", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    if dashed:
        handles.append(Line2D([], [], color="gray", linestyle="--", linewidth=1))
        names.append("before edit (dashed, in its metric's colour)")
    ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _points(table: Mapping[str, Any], x_key: str, y_key: str) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """Per method: (lr or None, x mean, y mean, x std, y std) of every grid point, sorted by lr when the grid
    varies it."""
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for label, row in table["rows"].items():
        if x_key == "lr":
            x, sx = table["axes"][label].get("lr"), 0.0
            if x is None:
                continue
        else:
            x, sx = mean_std(row.get(x_key, []))
        y, sy = mean_std(row.get(y_key, []))
        if not (math.isnan(float(x)) or math.isnan(y)):
            lr = table["axes"][label].get("lr")
            out[table["methods"][label]].append((lr or 0.0, lr, float(x), y, sx or 0.0, sy or 0.0))
    return {m: [p[1:] for p in sorted(pts, key=lambda p: p[0])] for m, pts in out.items()}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _draw_methods(ax: Any, points: Mapping[str, list[tuple[Any, ...]]], xerr: bool) -> None:
    """One line per method. A method whose points are exactly another's (it would be drawn hidden under it) is
    drawn dashed with larger hollow markers and named in the legend ``atp (= flu)``, as the table's notes say."""
    drawn: dict[str, tuple[tuple[float, float], ...]] = {}
    for i, (method, pts) in enumerate(points.items()):
        _, xs, ys, sx, sy = zip(*pts)
        key = tuple((round(x, 9), round(y, 9)) for x, y in zip(xs, ys))
        same = next((m for m, k in drawn.items() if k == key), None)
        drawn.setdefault(method, key)
        style = {"marker": MARKERS[i % len(MARKERS)], "capsize": 2}
        if same is not None:
            style.update(fillstyle="none", markersize=11, linestyle="--", markeredgewidth=1.5)
        ax.errorbar(xs, ys, xerr=sx if xerr else None, yerr=sy, label=method if same is None else f"{method} (= {same})",
                    **style)


def plot_tradeoff(table: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Forget error (x) against maintain accuracy (y), one line per method through its grid points (by lr), each
    point labelled with its lr; coinciding methods are marked (``_draw_methods``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = _points(table, "forget_err", "maintain_acc")
    _draw_methods(ax, points, xerr=True)
    labelled = set()
    for pts in points.values():
        for lr, x, y, _, _ in pts:
            if lr is not None and (x, y, lr) not in labelled:
                labelled.add((x, y, lr))
                ax.annotate(f"lr {_short(lr)}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
    if table["before"].get("forget_err"):
        ax.plot([table["before"]["forget_err"][0]], [table["before"].get("maintain_acc", [math.nan])[0]], "k*",
                markersize=10, label=BEFORE)
    ax.set_xlabel("forget error ↑")
    ax.set_ylabel("maintain accuracy ↑")
    ax.set_title(title or "forget vs maintain across the grid", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_metric_vs_lr(table: Mapping[str, Any], path: str | os.PathLike, metric: str = "forget_err",
                      title: str = "") -> Path:
    """``metric`` (mean ± std over seeds) against the learning rate, one line per method (log x axis); coinciding
    methods are marked (``_draw_methods``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    _draw_methods(ax, _points(table, "lr", metric), xerr=False)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(dict(COLUMNS).get(metric, metric))
    ax.set_title(title or f"{metric} vs learning rate", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside the axes stay in the image
    plt.close(fig)
    return path


def comparison_lines(records: Iterable[Mapping[str, Any]] | str | os.PathLike) -> list[str]:
    """Under the tables, for each model and task whose runs are a comparison over seeds (each method at one setting,
    ``mu_fast.sweep.compare.is_comparison``: the demo's and ``mu-fast run``'s stores): the spread of what each seed
    selected and every method against FLU on the same seeds (paired 95% t intervals, Holm)."""
    from mu_fast.aggregate import paired_lines, paired_verdicts, selection_lines
    from mu_fast.sweep.compare import comparison, is_comparison

    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in _records(records):
        if _placeable(r.get("config")) and r.get("status") == "ok":
            grouped[(r["config"]["model"]["ref"], _task_label(r["config"]["task"]))].append(r)
    lines: list[str] = []
    for (model, task), recs in grouped.items():
        if not is_comparison(recs):
            continue
        seeds: dict[str, set[int]] = defaultdict(set)
        for r in recs:
            seeds[r["config"]["method"]].add(r["config"]["seed"])
        if len({frozenset(s) for s in seeds.values()}) > 1:  # a damaged or unfinished store: no like-for-like
            lines += ["", f"{model} · {task}: the selection spread and paired intervals are left out: the methods "
                      "ran on different seeds (a damaged or unfinished store)"]
            continue
        report = comparison(recs)
        if report["n_seeds"] < 2:
            continue
        lines += ["", f"{model} · {task}"] + selection_lines(report["methods"], report["n_seeds"])
        if report.get("paired"):
            lines += paired_lines(report["paired"]) + paired_verdicts(report["paired"])
    return lines


def write_report(records: Iterable[Mapping[str, Any]] | str | os.PathLike, out_dir: str | os.PathLike,
                 metric: str = "forget_err") -> dict[str, Any]:
    """Write ``table.txt`` and, per table, ``robustness_<slug>.png``, ``tradeoff_<slug>.png`` and
    ``<metric>_vs_lr_<slug>.png`` into ``out_dir``; return ``{"table": path, "text": str, "plots": [paths]}``."""
    recs = _records(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([format_table(recs), *comparison_lines(recs)])
    (out / "table.txt").write_text(text + "\n")
    plots = []
    for (model, task), table in tables(recs).items():
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(model).name}_{task}").strip("_")
        title = f"{model} · {task}"
        plots.append(plot_robustness(table, out / f"robustness_{slug}.png", title))
        plots.append(plot_tradeoff(table, out / f"tradeoff_{slug}.png", title))
        plots.append(plot_metric_vs_lr(table, out / f"{metric}_vs_lr_{slug}.png", metric, title))
    return {"table": out / "table.txt", "text": text, "plots": plots}
