"""``kedit report`` over ``kedit unlearn`` runs: a row per run and the forget-quality vs model-utility scatter PNG
(one point per method, the retain model as the reference star)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kedit.testbed import assets_dir


def test_report_writes_the_forget_quality_vs_utility_scatter(tmp_path):
    from kedit.cli import app

    runner = CliRunner()
    dirs = []
    for method in ("grad_ascent", "npo"):
        d = tmp_path / method
        res = runner.invoke(app, ["unlearn", "--model", "testbed-gpt2", "--method", method, "--forget",
                                  "testbed:forget01", "--out", str(d), "--retain-model",
                                  str(assets_dir("default") / "gpt2"), "--set", "max_steps=1", "--eval-size", "4",
                                  "--json"])
        assert res.exit_code == 0, res.output
        dirs.append(str(d))
    rep_dir = tmp_path / "rep"
    res = runner.invoke(app, ["report", *dirs, "--out", str(rep_dir), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    png = rep_dir / "forget_quality_vs_utility.png"
    assert rep["plots"] == [str(png)] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [r["label"].split()[0] for r in rep["rows"]] == ["grad_ascent", "npo"]
    assert all(0.0 <= r["metrics"]["forget_quality"]["mean"] <= 1.0 for r in rep["rows"])
    md = (rep_dir / "report.md").read_text()
    assert "forget_quality_vs_utility.png" in md and md.count("| grad_ascent") == 1
    bad = runner.invoke(app, ["report", dirs[0], str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert bad.exit_code != 0  # a directory that is no run of either kind
