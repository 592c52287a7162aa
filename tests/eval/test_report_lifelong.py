"""The lifelong plot's curve names and perplexity ratio (result files only; no model)."""

from __future__ import annotations

import pytest

from kedit.eval.report import lifelong_label, lifelong_points, plot_lifelong
from kedit.eval.runner import EvalRun


def _run(method, cfg, ppl, *, k=100, model="testbed-gpt2", complete=True, base=8.0):
    cps = [{"n_edits": n, "metrics": {"capability/perplexity": {"mean": p, "pre_mean": base},
                                      "reliability/exact_match": {"mean": 0.5}}}
           for n, p in zip((100, 300, 1000), ppl)]
    summary = {"method": method, "protocol": "lifelong/v1", "batch_size": k, "model": model,
               "complete": complete, "checkpoints": cps, "metrics": cps[-1]["metrics"]}
    return EvalRun({"method_config": cfg}, [], summary)


def test_labels_tell_variants_apart():
    assert lifelong_label(_run("memit", {"strategy": "spread", "norm_anchor": False}, [8])) == "memit k=100 testbed-gpt2"
    assert lifelong_label(_run("memit", {"strategy": "spread", "norm_anchor": True}, [8])) == \
        "memit+NAS k=100 testbed-gpt2"
    # the strategy is named once: from the method name, or added when the name lacks it
    assert lifelong_label(_run("memit-blue", {"strategy": "blue"}, [8])) == "memit-blue k=100 testbed-gpt2"
    assert lifelong_label(_run("alphaedit", {"strategy": "blue", "norm_anchor": True}, [8], k=10,
                               model="testbed-llama", complete=False)) == \
        "alphaedit-blue+NAS k=10 testbed-llama (incomplete)"
    assert lifelong_label(_run("grace", {}, [8])) == "grace k=100 testbed-gpt2"


def test_perplexity_points_relative_to_base():
    r = _run("memit", {}, [8.0, 12.0, 400.0])
    assert lifelong_points(r, "capability/perplexity") == [(100.0, 8.0), (300.0, 12.0), (1000.0, 400.0)]
    assert lifelong_points(r, "capability/perplexity", relative=True) == [(100.0, 1.0), (300.0, 1.5), (1000.0, 50.0)]
    r.summary["checkpoints"][1]["metrics"]["capability/perplexity"]["pre_mean"] = None  # no base: left out
    assert [x for x, _ in lifelong_points(r, "capability/perplexity", relative=True)] == [100.0, 1000.0]


def test_plot_many_runs_log_ratio_axis(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    orig = Figure.savefig

    def keep(self, *a, **kw):
        saved.append(self)
        return orig(self, *a, **kw)

    runs = [_run(f"m{i}", {"norm_anchor": i % 2 == 1}, [8.0, 8.0 * (i + 1), 8.0 * 10 ** i],
                 model="testbed-llama" if i >= 6 else "testbed-gpt2") for i in range(12)]
    Figure.savefig = keep
    try:
        p = plot_lifelong(runs, tmp_path / "ll.png")
    finally:
        Figure.savefig = orig
    assert p is not None and p.stat().st_size > 0
    axes = saved[0].axes
    ppl = next(ax for ax in axes if ax.get_title().startswith("perplexity / base"))
    assert ppl.get_yscale() == "log"
    curves = [ln for ln in ppl.get_lines() if len(ln.get_xdata()) == 3]
    assert len(curves) == 12 and max(max(ln.get_ydata()) for ln in curves) == pytest.approx(1e11)
    assert any(list(ln.get_ydata()) == [2.0, 2.0] for ln in ppl.get_lines())  # the collapse line
    # twelve runs: no two share (colour, line style, marker); the legend sits on a panel of its own
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in curves}
    assert len(styles) == 12
    legend_axes = [ax for ax in axes if ax.get_legend() is not None]
    assert len(legend_axes) == 1 and not legend_axes[0].get_lines()
    assert len(legend_axes[0].get_legend().get_texts()) == 12
