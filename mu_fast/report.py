"""Reports: the results table in the terminal, JSON written atomically, and plots (matplotlib, Agg backend).

A report folder holds ``results.json`` (everything), one ``<method>.json`` per localization, and PNG plots:
``probe_accuracy.png`` (per-layer probe accuracy at the subject's last token), ``localization_map.png``
(which attention / MLP layers each method trains) and ``robustness.png`` (forget error, MCQ and relearned
accuracy per method). The terminal table is plain text at most 100 columns wide, with a legend of its columns and
of the component names (``a1``, ``m0.17``, ``a3.v``) under it; results.json holds the same legend.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Columns of the comparison table: (key in a method's summary, two header lines, format). Headers are short so
# that the table fits 100 columns; COLUMN_LEGEND spells each one out under the table and in results.json. Seconds
# per method are in results.json, not in the table, so that the table of a deterministic run is the same every time.
TABLE_COLUMNS: tuple[tuple[str, tuple[str, str], str], ...] = (
    ("trainable_params", ("", "params"), "{:,}"),
    ("forget_err", ("forget", "err ↑"), "{:.2f}"),
    ("edit_acc", ("edit", "acc ↑"), "{:.2f}"),
    ("maintain_acc", ("maint", "acc ↑"), "{:.2f}"),
    ("qa_edit_acc", ("Q/A", "edit ↑"), "{:.2f}"),
    ("mcq_forget_err", ("MCQ", "err ↑"), "{:.2f}"),
    ("mcq_edit_acc", ("MCQ", "edit ↑"), "{:.2f}"),
    ("paraphrase_edit_acc", ("para", "edit ↑"), "{:.2f}"),
    ("other_attr_acc", ("other", "attr ↑"), "{:.2f}"),
    ("relearn_acc", ("relearn", "acc ↓"), "{:.2f}"),
    ("probe_true_acc", ("probe", "acc ↓"), "{:.2f}"),
)
COLUMN_LEGEND: dict[str, str] = {
    "params": "parameters the edit trains",
    "forget err": "1 - accuracy of the true answer on the edited (forget) facts, training format",
    "edit acc": "accuracy of the injected answer on the forget facts",
    "maint acc": "accuracy on the maintain facts (must not change)",
    "Q/A edit": "injected-answer accuracy in the question/answer format",
    "MCQ err": "1 - multiple-choice accuracy on the forget facts",
    "MCQ edit": "injected-answer accuracy in multiple choice",
    "para edit": "injected-answer accuracy on paraphrased prompts",
    "other attr": "accuracy of another attribute of the edited subjects (organism: home city)",
    "relearn acc": "held-out forget accuracy after the LoRA relearning attack",
    "probe acc": "best latent-probe accuracy of the true answer after the embeddings",
    "↑ / ↓": "higher / lower is better; accuracies are probabilities normalised over the answer choices",
}
COMPONENT_LEGEND: dict[str, str] = {
    "aL": "attention block of layer L (all heads: q, k, v, o)",
    "aL.H": "head H of attention layer L",
    "aL.q / aL.k / aL.v / aL.o": "one projection matrix of attention layer L",
    "mL": "MLP of layer L (gate, up, down)",
    "mL.N": "neuron N of MLP layer L",
    "mL.gate / mL.up / mL.down": "one matrix of MLP layer L",
}
TABLE_WIDTH = 100


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a result; mode as any new file."""
    from mu_fast.files import as_new_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_default)
        as_new_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def format_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "mu_fast results",
                 width: int = TABLE_WIDTH, stds: Mapping[str, Mapping[str, Any]] | None = None,
                 columns: Sequence[str] | None = None) -> str:
    """The per-method summaries as plain text at most ``width`` columns wide (columns no method reports are left
    out). Method names are never cut: when the columns do not fit beside them, they continue in a second block.
    stds: per method, the sample std of a number over seeds: its cell reads ``0.87±0.03``. columns: the summary keys
    to show (default every column of ``TABLE_COLUMNS``)."""
    stds = stds or {}
    chosen = [c for c in TABLE_COLUMNS if columns is None or c[0] in columns]
    columns_ = [c for c in chosen if any(c[0] in s for s in summaries.values())]
    names = ["localization", *summaries]
    name_width = max(len(n) for n in names)
    cells = {}
    for key, header, fmt in columns_:
        values = []
        for method, summary in summaries.items():
            value = summary.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            if not missing and key == "trainable_params":
                value = int(round(value))  # a mean over seeds whose budget matching drew different counts
            text = "—" if missing else fmt.format(value)
            spread = (stds.get(method) or {}).get(key)
            if not missing and spread is not None and key != "trainable_params":
                text += f"±{spread:.2f}"
            values.append(text)
        cells[key] = (header, values, max(len(v) for v in (*header, *values)))
    blocks, block, used = [], [], name_width
    for key, *_ in columns_:
        cost = 1 + cells[key][2]
        if block and used + cost > width:
            blocks.append(block)
            block, used = [], name_width
        block.append(key)
        used += cost
    if block or not blocks:
        blocks.append(block)
    lines = [title]
    for keys in blocks:
        gap = 2 if name_width + sum(2 + cells[k][2] for k in keys) <= width else 1
        for row in range(2):
            head = ("localization" if row == 1 else "").ljust(name_width)
            lines.append((head + "".join(" " * gap + cells[k][0][row].rjust(cells[k][2]) for k in keys)).rstrip())
        lines.append("-" * (name_width + sum(gap + cells[k][2] for k in keys)))
        for i, method in enumerate(summaries):
            lines.append(method.ljust(name_width) + "".join(" " * gap + cells[k][1][i].rjust(cells[k][2]) for k in keys))
    return "\n".join(lines)


def format_legend(width: int = TABLE_WIDTH, columns: Mapping[str, str] | None = None,
                  components: bool = True) -> str:
    """The column and component-name legend printed under the table, wrapped to ``width``. columns: another
    table's column legend (default ``COLUMN_LEGEND``); components: add the component names' legend."""
    import textwrap

    text = "; ".join(f"{k}: {v}" for k, v in (COLUMN_LEGEND if columns is None else columns).items())
    lines = textwrap.wrap("Columns: " + text, width)
    if components:
        names = "; ".join(f"{k} = {v}" for k, v in COMPONENT_LEGEND.items())
        lines += textwrap.wrap("Components: " + names, width)
    return "\n".join(lines)


def legend() -> dict[str, dict[str, str]]:
    """The legend as stored in results.json."""
    return {"columns": dict(COLUMN_LEGEND), "components": dict(COMPONENT_LEGEND)}


def print_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "mu_fast results",
                stds: Mapping[str, Mapping[str, Any]] | None = None, columns: Sequence[str] | None = None) -> None:
    """Print ``format_table`` and the legend (plain text, the same in a terminal, a pipe or a log)."""
    print(format_table(summaries, title, stds=stds, columns=columns))
    print(format_legend())


def environment() -> dict[str, Any]:
    """The numerics part of the provenance block (``mu_fast.provenance.provenance_block``, which every JSON carries)
    in the older flat layout: ``mu_fast``, ``python``, ``packages``, ``torch_threads``, ``cpu_capability``,
    ``kernel_env``, ``machine``, ``processor``, ``cuda``."""
    from mu_fast.provenance import provenance_block

    block = provenance_block()
    versions, host = block["versions"], block["host"]
    return {"mu_fast": versions["mu_fast"], "python": versions["python"],
            "packages": {k: v for k, v in versions.items() if k not in ("mu_fast", "python")},
            "torch_threads": host["torch_threads"], "cpu_capability": host["cpu_capability"],
            "kernel_env": host["kernel_env"], "machine": host["machine"], "processor": host["processor"],
            "cuda": block["device"].get("cuda")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probe_accuracy(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, chance: float | None = None,
                        selected: Sequence[int] = (), title: str = "Sport decodability at the subject's last token") -> Path:
    """Line plot of per-layer probe accuracy; ``curves`` maps a label (e.g. "after MLP") to ``[L]`` values."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, values in curves.items():
        ax.plot(range(len(values)), list(values), marker="o", label=label)
    for layer in selected:
        ax.axvspan(layer - 0.4, layer + 0.4, color="tab:green", alpha=0.15)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    n = max((len(v) for v in curves.values()), default=0)
    if n:
        ax.set_xticks(range(0, n, max(1, n // 16)))  # whole layers only
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out probe accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title + (" (shaded: FLU MLPs)" if selected else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_localization_map(selections: Mapping[str, Mapping[str, Sequence[float]]], n_layers: int, path: str | os.PathLike,
                          n_seeds: int = 1, enrichment: Mapping[str, Any] | None = None) -> Path:
    """Heat map: rows = methods × {attn, mlp}, columns = layers, value = fraction of that block trained (averaged
    over ``n_seeds`` seeds: a block one seed in three trains shows at 1/3). enrichment (``FLUResult.
    enrichment_shares()``): two first rows with each block's share of the probe's rise (where the lookup happens)."""
    plt = _plt()
    import numpy as np

    labels, rows = [], []
    rise = (enrichment or {}).get("rise") or 0
    if rise > 0:
        for kind in ("attn", "mlp"):
            gains = [max(0.0, g / rise) for g in enrichment[f"{kind}_gain"]]
            labels.append(f"probe rise share · {kind}")
            rows.append((gains + [0.0] * n_layers)[:n_layers])
    for method, sel in selections.items():
        for kind in ("attn", "mlp"):
            labels.append(f"{method} · {kind}")
            rows.append(list(sel.get(kind, [0.0] * n_layers)))
    data = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * n_layers + 3), 0.32 * len(labels) + 1.4))
    im = ax.imshow(data, aspect="auto", cmap="Greens", vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_title("What each localization trains (fraction of the block" +
                 (f", mean over {n_seeds} seeds)" if n_seeds > 1 else ")") +
                 ("\nfirst rows: each block's share of the FLU probe's rise" if rise > 0 else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_robustness(summaries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                    keys: Sequence[tuple[str, str]] = (("forget_err", "forget error"), ("mcq_forget_err", "MCQ forget error"),
                                                       ("relearn_acc", "relearned accuracy"),
                                                       ("probe_true_acc", "latent probe accuracy")),
                    stds: Mapping[str, Mapping[str, Any]] | None = None,
                    before: Mapping[str, Any] | None = None) -> Path:
    """Grouped bar chart of robustness metrics per localization method; ``stds`` (per method and key: the sample
    std over seeds) draws error bars, ``before`` (the unedited model's summary) a dashed reference per metric, in
    its metric's colour and named in the legend. The legend sits beside the axes, never over the bars."""
    plt = _plt()
    import numpy as np
    from matplotlib.lines import Line2D

    stds = stds or {}
    methods = list(summaries)
    keys = [k for k in keys if any(k[0] in s for s in summaries.values())]
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) + 2), 3.9))
    x = np.arange(len(methods))
    dashed = False
    for i, (key, label) in enumerate(keys):
        vals = [float(summaries[m].get(key, float("nan"))) for m in methods]
        errs = [float((stds.get(m) or {}).get(key) or 0.0) for m in methods]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=label,
                      yerr=errs if any(errs) else None, capsize=2, error_kw={"lw": 0.8})
        ref = (before or {}).get(key)
        if isinstance(ref, (int, float)) and math.isfinite(ref):
            ax.axhline(ref, color=bars.patches[0].get_facecolor(), ls="--", lw=0.8, alpha=0.7)
            dashed = True
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy / error")
    n = max((len(v) for v in stds.values()), default=0)
    title = "Edit robustness per localization (higher error, lower relearned / probe = more robust)"
    ax.set_title(title + ("\nbars: mean ± std over seeds" if n else ""), fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if dashed:
        handles.append(Line2D([], [], color="gray", ls="--", lw=0.8))
        labels.append("before the edit (dashed, in its metric's colour)")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
