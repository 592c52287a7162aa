"""The command line: --version, methods, edit --json contract, delta inspect/apply/revert round trip, demo."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kedit import __version__
from kedit.cli import _register_extensions, app
from kedit.testbed import assets_dir

_register_extensions()
runner = CliRunner()


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_version_and_methods():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout
    methods = json.loads(runner.invoke(app, ["methods", "--json"]).stdout)
    names = {m["name"] for m in methods}
    assert {"rome", "r-rome", "memit", "pmet", "alphaedit", "emmet", "ft-l", "ft-m", "lora", "kn"} <= names
    assert all(m["paper"] for m in methods)


def test_edit_json_and_delta_round_trip(tmp_path):
    out = _json(
        runner.invoke(
            app,
            ["edit", "--model", "testbed-gpt2", "--method", "rome", "--requests", "testbed:2",
             "--set", "mom2_n_tokens=5000", "--save-delta", str(tmp_path / "d"), "--json"],
        )
    )
    assert set(out) == {"method", "model", "n_requests", "success_rate", "seconds", "delta"}
    assert out["method"] == "rome" and out["n_requests"] == 2 and 0.0 <= out["success_rate"] <= 1.0
    assert (tmp_path / "d" / "edit_config.json").is_file()

    info = _json(runner.invoke(app, ["delta", "inspect", str(tmp_path / "d"), "--json"]))
    assert info["method"] == "rome" and info["params"][0]["rank"] == 2

    applied = _json(runner.invoke(app, ["delta", "apply", str(tmp_path / "d"), "--model", "testbed-gpt2",
                                        "--out", str(tmp_path / "edited")]))
    assert applied["applied"]
    restored = _json(runner.invoke(app, ["delta", "revert", str(tmp_path / "d"), "--model",
                                         str(tmp_path / "edited"), "--out", str(tmp_path / "restored")]))
    assert restored["reverted"]
    base = load_file(str(assets_dir() / "gpt2" / "model.safetensors"))
    edited = load_file(str(tmp_path / "edited" / "model.safetensors"))
    again = load_file(str(tmp_path / "restored" / "model.safetensors"))
    param = info["params"][0]["param"]
    assert not torch.equal(base[param], edited[param])
    assert all(torch.equal(base[k], again[k]) for k in base)

    # applying to a model that is not the delta's base is refused with a clear message
    bad = runner.invoke(app, ["delta", "apply", str(tmp_path / "d"), "--model", "testbed-llama",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0


def test_edit_rejects_bad_input(tmp_path):
    r = runner.invoke(app, ["edit", "--method", "nope", "--requests", "testbed:1", "--json"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["edit", "--requests", str(tmp_path / "missing.json"), "--json"])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["edit", "--requests", "testbed:1", "--set", "no_such_field=1", "--json"])
    assert r.exit_code == 2 and "unknown config keys" in r.output


@pytest.mark.parametrize("model", ["testbed-gpt2"])
def test_demo_json(model):
    out = _json(runner.invoke(app, ["demo", "--model", model, "--n", "2", "--json"]))
    assert out["n_requests"] == 2 and out["method"] == "rome"
    kinds = {p["kind"] for p in out["probes"]}
    assert kinds == {"prompt", "paraphrase", "neighbour"}
    assert all(p["before"] != "" for p in out["probes"])


def test_testbed_request_specs():
    import typer

    from kedit.cli import resolve_requests
    from kedit.testbed import edit_requests, load_world

    world_reqs = edit_requests(load_world(), n=12)
    assert [r.case_id for r in resolve_requests("testbed:5")] == [r.case_id for r in world_reqs[:5]]
    held = resolve_requests("testbed:8-12")
    assert [r.case_id for r in held] == [r.case_id for r in world_reqs[8:12]]
    assert len(resolve_requests("testbed:8-12", limit=2)) == 2
    for bad in ("testbed:5-5", "testbed:x", "testbed:7-3"):
        with pytest.raises(typer.Exit):
            resolve_requests(bad)
