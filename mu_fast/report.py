"""Reports: the results table in the terminal, JSON written atomically, and plots (matplotlib, Agg backend).

A report folder holds ``results.json`` (everything), one ``<method>.json`` per localization, and PNG plots:
``probe_accuracy.png`` (per-layer probe accuracy at the subject's last token), ``localization_map.png``
(which attention / MLP layers each method trains) and ``robustness.png`` (forget error, MCQ and relearned
accuracy per method).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Columns of the comparison table: (key in a method's summary, header, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("trainable_params", "params", "{:,}"),
    ("forget_err", "forget err ↑", "{:.2f}"),
    ("edit_acc", "edit acc ↑", "{:.2f}"),
    ("maintain_acc", "maintain ↑", "{:.2f}"),
    ("qa_edit_acc", "Q/A edit ↑", "{:.2f}"),
    ("mcq_forget_err", "MCQ forget err ↑", "{:.2f}"),
    ("mcq_edit_acc", "MCQ edit ↑", "{:.2f}"),
    ("paraphrase_edit_acc", "para edit ↑", "{:.2f}"),
    ("other_attr_acc", "other attr ↑", "{:.2f}"),
    ("relearn_acc", "relearned ↓", "{:.2f}"),
    ("probe_true_acc", "latent probe ↓", "{:.2f}"),
    ("seconds", "time s", "{:.1f}"),
)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_default)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def results_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "mu_fast results") -> Any:
    """A rich Table of per-method summaries (columns that no method reports are left out)."""
    from rich.table import Table

    columns = [c for c in TABLE_COLUMNS if any(c[0] in s for s in summaries.values())]
    table = Table(title=title, title_justify="left")
    table.add_column("localization", style="bold")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for method, summary in summaries.items():
        cells = []
        for key, _, fmt in columns:
            value = summary.get(key)
            cells.append("—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        table.add_row(method, *cells)
    return table


def print_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "mu_fast results") -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=180)
    console.print(results_table(summaries, title))


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


def plot_localization_map(selections: Mapping[str, Mapping[str, Sequence[float]]], n_layers: int, path: str | os.PathLike) -> Path:
    """Heat map: rows = methods × {attn, mlp}, columns = layers, value = fraction of that block trained."""
    plt = _plt()
    import numpy as np

    labels, rows = [], []
    for method, sel in selections.items():
        for kind in ("attn", "mlp"):
            labels.append(f"{method} · {kind}")
            rows.append(list(sel.get(kind, [0.0] * n_layers)))
    data = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n_layers + 3), 0.32 * len(labels) + 1.2))
    im = ax.imshow(data, aspect="auto", cmap="Greens", vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_title("What each localization trains (fraction of the block)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_robustness(summaries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                    keys: Sequence[tuple[str, str]] = (("forget_err", "forget error"), ("mcq_forget_err", "MCQ forget error"),
                                                       ("relearn_acc", "relearned accuracy"))) -> Path:
    """Grouped bar chart of robustness metrics per localization method."""
    plt = _plt()
    import numpy as np

    methods = list(summaries)
    keys = [k for k in keys if any(k[0] in s for s in summaries.values())]
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) + 2), 3.8))
    x = np.arange(len(methods))
    for i, (key, label) in enumerate(keys):
        vals = [float(summaries[m].get(key, float("nan"))) for m in methods]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=label)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy / error")
    ax.set_title("Edit robustness per localization (higher error, lower relearned = more robust)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
