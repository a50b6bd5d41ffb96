"""Plots say what they draw: legends never cover the bars, the dashed before-edit lines have a legend entry, a
method drawn exactly under another is marked, and trade-off points carry their learning rate."""

from __future__ import annotations

import pytest

from mu_fast import report as run_report
from mu_fast.sweep import report as sweep_report


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions close, kept open for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        matplotlib.pyplot.figure(fig.number) if fig is not None else None
    import matplotlib.pyplot as plt2

    plt2.close("all")


def _records(same_as_flu: str = "random_mlps", lrs=(1e-3, 3e-3), seeds=(0, 1)):
    """Records where ``same_as_flu`` scores exactly what flu scores (it chose the same components), atp differs."""
    out = []
    for method, shift in (("flu", 0.0), ("atp", 0.1), (same_as_flu, 0.0)):
        for i, lr in enumerate(lrs):
            for seed in seeds:
                value = 0.3 + 0.2 * i + 0.05 * seed + shift
                out.append({
                    "run_id": f"{method}{lr}{seed}", "status": "ok",
                    "config": {"run_id": f"{method}{lr}{seed}", "model": {"ref": "organism:ci"}, "method": method, "seed": seed, "axes": {"lr": lr},
                               "task": {"dataset": "organism", "forget_split": "first_16_unsplit",
                                        "inject_label": "random_without_golf"}},
                    "metrics": {"forget_err": value, "maintain_acc": 1 - value / 2, "mcq_forget_err": value,
                                "relearn_acc": 1 - value, "probe_true_acc": 0.5},
                    "before": {"forget_err": 0.02, "maintain_acc": 0.99, "mcq_forget_err": 0.05},
                })
    return out


def _table():
    return next(iter(sweep_report.tables(_records()).values()))


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _legend_covers_bars(fig, ax) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
    return any(legend.overlaps(bar) for bar in bars)


def test_sweep_robustness_names_the_dashed_lines_and_keeps_the_legend_off_the_bars(figures, tmp_path):
    sweep_report.plot_robustness(_table(), tmp_path / "r.png")
    fig = figures[-1]
    ax = fig.axes[0]
    assert any(line.get_linestyle() == "--" for line in ax.lines)
    assert any("before edit" in text and "dashed" in text for text in _legend_texts(ax)), _legend_texts(ax)
    assert not _legend_covers_bars(fig, ax)


def test_run_robustness_names_the_dashed_lines_and_keeps_the_legend_off_the_bars(figures, tmp_path):
    summaries = {m: {"forget_err": 0.95, "mcq_forget_err": 0.9, "relearn_acc": 0.9, "probe_true_acc": 0.95}
                 for m in ("flu", "flu_attn", "atp", "ct", "random", "random_mlps", "all_mlps", "nonlocalized")}
    stds = {m: {"forget_err": 0.02} for m in summaries}
    run_report.plot_robustness(summaries, tmp_path / "r.png", stds=stds,
                               before={"forget_err": 0.0, "mcq_forget_err": 0.0})
    fig = figures[-1]
    ax = fig.axes[0]
    assert any("before the edit" in text for text in _legend_texts(ax)), _legend_texts(ax)
    assert not _legend_covers_bars(fig, ax)


@pytest.mark.parametrize("plot", ["tradeoff", "metric_vs_lr"])
def test_a_method_drawn_under_another_is_marked(plot, figures, tmp_path):
    getattr(sweep_report, f"plot_{plot}")(_table(), tmp_path / "p.png")
    ax = figures[-1].axes[0]
    texts = _legend_texts(ax)
    assert "random_mlps (= flu)" in texts and "flu" in texts and "atp" in texts, texts
    assert not any("(=" in t for t in texts if t.startswith(("flu", "atp"))), texts


def test_tradeoff_points_carry_their_learning_rate(figures, tmp_path):
    sweep_report.plot_tradeoff(_table(), tmp_path / "t.png")
    ax = figures[-1].axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("lr 0.001") >= 2 and labels.count("lr 0.003") >= 2, labels  # flu's and atp's points


def test_write_report_still_writes_every_plot(tmp_path):
    out = sweep_report.write_report(_records(), tmp_path / "report")
    assert len(out["plots"]) == 3 and all(p.stat().st_size > 5000 for p in out["plots"])
