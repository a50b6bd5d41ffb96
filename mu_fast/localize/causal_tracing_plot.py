"""A heatmap of one prompt's causal-tracing grid (tokens × layers), drawn with matplotlib's Agg canvas
(object-oriented API: no pyplot, no global backend change, works without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mu_fast.localize.causal_trace_grid import CausalTraceGrid

_CMAPS = {"layer": "Purples", "mlp": "Greens", "attn": "Reds"}
_NAMES = {"layer": "single restored layer", "mlp": "MLP", "attn": "attention"}


def plot_causal_trace(
    grid: CausalTraceGrid, prompt: int = 0, tokenizer: Any = None, path: str | Path | None = None, title: str | None = None
) -> Any:
    """Heatmap of ``grid.prompt(prompt)`` (rows: the prompt's tokens, subject tokens starred; columns:
    layers) and return the matplotlib ``Figure``; saved to ``path`` (PNG, PDF, SVG by suffix) when given.
    tokenizer: decodes the token labels (default: token ids)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in requirements.txt
        raise RuntimeError("plot_causal_trace needs matplotlib: pip install 'matplotlib>=3.8'") from err
    if not 0 <= prompt < len(grid.input_ids):
        raise ValueError(f"prompt {prompt} is out of range for a grid of {len(grid.input_ids)} prompts")
    values = grid.prompt(prompt).double().numpy()
    ids = grid.input_ids[prompt]
    labels = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in ids]
    a, b = int(grid.subject_first[prompt]), int(grid.subject_last[prompt])
    labels = [f"{s}*" if a <= t <= b else s for t, s in enumerate(labels)]
    n, L = values.shape
    fig = Figure(figsize=(1.0 + 0.35 * L, 1.0 + 0.3 * n), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.pcolormesh(values, cmap=_CMAPS[grid.kind])
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(n)], labels)
    ax.set_xticks([i + 0.5 for i in range(L)], [str(i) for i in range(L)])
    window = f", window {grid.window}" if grid.window > 1 else ""
    ax.set_xlabel(f"restored {_NAMES[grid.kind]} at layer{window}")
    unit = "normalised indirect effect" if grid.normalize else f"{grid.info.get('metric', 'metric')} restored − corrupted"
    ax.set_title(title or f"Causal trace ({grid.kind}), prompt {prompt}", fontsize=9)
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(unit, fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
