"""The command line: --version, methods, edit --json contract, delta inspect/apply/revert round trip, demo,
checks before loading, the statistics cache, record naming, output at 80 columns, testbed info."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from kedit import __version__
from kedit.cli import _register_extensions, app
from kedit.testbed import assets_dir

_register_extensions()  # a no-op kept for old callers: the eval commands are registered at import
runner = CliRunner()
FAST_ROME = ["--set", "mom2_n_tokens=3000", "--set", "v_steps=10"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "kedit-cache"
    monkeypatch.setenv("KEDIT_CACHE", str(d))
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import kedit.api

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(kedit.api, "load_model", refuse)


def _render(renderable, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


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


def test_edit_json_and_delta_round_trip(tmp_path, cache_dir):
    out = _json(
        runner.invoke(
            app,
            ["edit", "--model", "testbed-gpt2", "--method", "rome", "--requests", "testbed:2", "--batch-size", "2",
             "--set", "mom2_n_tokens=5000", "--save-delta", str(tmp_path / "d"), "--json"],
        )
    )
    assert set(out) == {"method", "model", "n_requests", "success_rate", "immediate_success_rate", "n_errors",
                        "errors", "rollback_bytes", "seconds", "delta"}
    assert out["method"] == "rome" and out["n_requests"] == 2 and 0.0 <= out["success_rate"] <= 1.0
    # one ROME update of one c_proj weight is held for rollback: its original tensor, in float32
    from kedit.testbed import load_testbed_model

    m, _ = load_testbed_model("gpt2")
    layer_bytes = {p.numel() * p.element_size() for n, p in m.named_parameters() if n.endswith("mlp.c_proj.weight")}
    assert out["rollback_bytes"] in layer_bytes
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
def test_demo_json(model, cache_dir):
    out = _json(runner.invoke(app, ["demo", "--model", model, "--n", "2", "--json"]))
    from kedit.cli import DEMO_METHOD

    assert out["n_requests"] == 2 and out["method"] == DEMO_METHOD
    for aspect, kind in (("reliability", "prompt"), ("generalization", "paraphrase"), ("locality", "neighbour")):
        oks = [p["ok"] for p in out["probes"] if p["kind"] == kind]
        assert out[aspect] == sum(oks) / len(oks)
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


# -- the eval commands exist however the app is imported (issue #11 item 5) -------------------------------------------
def test_eval_and_report_registered_on_import():
    code = ("import sys; from kedit.cli import app; import typer.main; "
            "names = set(typer.main.get_command(app).commands); "
            "print(sorted(names)); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, torch_loaded = res.stdout.strip().splitlines()
    assert {"eval", "report", "edit", "demo", "cache", "testbed"} <= set(json.loads(names.replace("'", '"')))
    assert torch_loaded == "False"  # `kedit --help` does not pay for importing torch
    assert "import kedit.cli" not in open(sys.modules["kedit.eval.cli"].__file__).read()


# -- refused before the model is loaded, the same way on every command (issue #16 item 2) -------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "rome", "--set", "no_such_field=1"], "unknown config keys ['no_such_field']"),
        (["--method", "rome", "--limit", "-1"], "--limit"),
        (["--method", "rome", "--limit", "0"], "--limit"),
        (["--method", "rome", "--batch-size", "0"], "--batch-size"),
    ],
)
@pytest.mark.parametrize("command", ["edit", "eval"])
def test_bad_input_is_refused_before_loading(command, args, message, no_model_load, tmp_path):
    base = (["edit", "--requests", "testbed:2"] if command == "edit"
            else ["eval", "--model", "testbed-gpt2", "--data", "testbed:2", "--out", str(tmp_path / "r")])
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output and "AssertionError" not in r.output


def test_demo_refuses_unknown_method_before_loading(no_model_load):
    r = runner.invoke(app, ["demo", "--method", "nope"])
    assert r.exit_code == 2 and "unknown method 'nope'" in r.output


def test_unavailable_model_fails_fast(no_model_load, monkeypatch):
    import kedit.cli_common as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["edit", "--model", "no-such-org/no-such-model", "--requests", "testbed:1"])
    assert r.exit_code == 2 and "not in the local Hugging Face cache" in r.output and "offline" in r.output
    # online but the hub cannot be reached: no minute of retries either
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(C, "_hub_reachable", lambda timeout=3.0: False)
    r = runner.invoke(app, ["eval", "--model", "no-such-org/no-such-model", "--method", "rome", "--data",
                            "testbed:1", "--out", "unused"])
    assert r.exit_code == 2 and "cannot be reached" in r.output
    r = runner.invoke(app, ["edit", "--model", "./no/such/dir", "--requests", "testbed:1"])
    assert r.exit_code == 2 and "no such directory" in r.output


# -- the persistent statistics cache (issue #16 item 1) ------------------------------------------------------------
def test_second_edit_reuses_cached_statistics(cache_dir, monkeypatch, tmp_path):
    import kedit.core.stats as S

    calls = []
    orig = S._collect_encoded
    monkeypatch.setattr(S, "_collect_encoded", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    args = ["edit", "--requests", "testbed:1", *FAST_ROME, "--json"]
    _json(runner.invoke(app, args))
    assert calls == [1]
    _json(runner.invoke(app, args))
    assert calls == [1]  # the second run read the statistics from the cache
    listing = _json(runner.invoke(app, ["cache", "ls", "--json"]))
    assert listing["directory"] == str(cache_dir / "stats") and len(listing["entries"]) == 1
    assert listing["bytes"] == listing["entries"][0]["bytes"] > 0
    text = runner.invoke(app, ["cache", "ls"]).stdout
    assert "1 entry, " in text and "MiB" in text
    # --no-cache: memory only (recomputed, nothing written); --stats-dir: that directory
    _json(runner.invoke(app, args + ["--no-cache"]))
    _json(runner.invoke(app, args + ["--stats-dir", str(tmp_path / "mine")]))
    assert calls == [1, 1, 1] and len(list((tmp_path / "mine").glob("*.safetensors"))) == 1
    assert len(_json(runner.invoke(app, ["cache", "ls", "--json"]))["entries"]) == 1
    r = runner.invoke(app, ["cache", "rm"])
    assert r.exit_code == 2 and "--all" in r.output
    r = runner.invoke(app, ["cache", "rm", listing["entries"][0]["key"][:12]])
    assert r.exit_code == 0 and "removed 1 entry" in r.stdout
    assert _json(runner.invoke(app, ["cache", "ls", "--json"]))["entries"] == []


# -- records named as the user knows them; --on-error record on edit; too-long prompts (items 3, 10b) -----------------
def _requests_file(tmp_path):
    from kedit.data import dump_requests
    from kedit.testbed import edit_requests, load_world

    good = edit_requests(load_world(), n=2)
    long = good[1].__class__("{} " + "and then it was said that " * 30 + "the answer is", subject=good[1].subject,
                             target_new=good[1].target_new, case_id="long-one")
    path = tmp_path / "reqs.jsonl"
    dump_requests([good[0], long], path)
    return path


def test_too_long_prompt_is_named_not_a_traceback(tmp_path, cache_dir):
    path = _requests_file(tmp_path)
    r = runner.invoke(app, ["edit", "--requests", str(path), *FAST_ROME])
    assert r.exit_code == 2, r.output
    assert "case long-one (record 2)" in r.output and "context window of 128" in r.output
    assert "IndexError" not in r.output and "Traceback" not in r.output
    out = _json(runner.invoke(app, ["edit", "--requests", str(path), *FAST_ROME, "--on-error", "record", "--json"]))
    assert out["n_errors"] == 1 and out["n_requests"] == 2
    (e,) = out["errors"]
    assert e["record"] == 2 and e["case_id"] == "long-one" and "too long" in e["error"]
    assert out["success_rate"] <= 0.5  # the skipped request did not take


def test_method_failure_names_the_record(tmp_path, cache_dir):
    from kedit.methods.registry import get_method

    spec = get_method("rome")
    orig = spec.compute

    def flaky(model, tok, requests, cfg, ctx):
        if any(r.case_id == "long-one" for r in requests):
            raise RuntimeError("boom")
        return orig(model, tok, requests, cfg, ctx)

    object.__setattr__(spec, "compute", flaky)  # MethodSpec is frozen
    try:
        path = _requests_file(tmp_path)
        # shorten the long one so it fits, keep its case_id
        lines = path.read_text().splitlines()
        rec = json.loads(lines[1])
        rec["prompt"] = "{} was born in"
        path.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
        r = runner.invoke(app, ["edit", "--requests", str(path), *FAST_ROME])
        assert r.exit_code == 2 and "case long-one (record 2)" in r.output and "RuntimeError: boom" in r.output
        out = _json(runner.invoke(app, ["edit", "--requests", str(path), *FAST_ROME, "--on-error", "record",
                                        "--json"]))
        assert [e["record"] for e in out["errors"]] == [2] and "boom" in out["errors"][0]["error"]
    finally:
        object.__setattr__(spec, "compute", orig)


# -- sequential single-edit methods: warned, and immediate vs final success (issue #11 item 7) -------------------------
def test_single_edit_method_warns_and_reports_immediate_success(cache_dir):
    r = runner.invoke(app, ["edit", "--requests", "testbed:3", *FAST_ROME, "--json"])
    out = _json(r)
    warning = " ".join(r.stderr.split())
    assert "applied one after another" in warning and "--method memit" in warning and "--method grace" in warning
    assert 0.0 <= out["immediate_success_rate"] <= 1.0 and 0.0 <= out["success_rate"] <= 1.0
    assert out["rollback_bytes"] > 0
    # a batch method gets no such warning
    r = runner.invoke(app, ["edit", "--method", "memit", "--requests", "testbed:2", "--set", "mom2_n_tokens=3000",
                            "--set", "v_steps=10", "--json"])
    assert "one after another" not in r.stderr
    assert _json(r)["immediate_success_rate"] == _json(r)["success_rate"]  # one batch: right after it = at the end
    # nor does a memory method: its edits sit side by side in the codebook, a later one cannot undo an earlier one
    r = runner.invoke(app, ["edit", "--method", "grace", "--requests", "testbed:3", "--json"])
    assert "one after another" not in r.stderr
    out = _json(r)
    assert out["success_rate"] == out["immediate_success_rate"] and out["rollback_bytes"] == 0


def test_immediate_success_is_measured_after_each_own_edit(monkeypatch):
    """In kedit.api.edit: a single-edit method is computed one request per call; each is checked right after."""
    import kedit.api as A
    from kedit.testbed import edit_requests, load_testbed_model, load_world

    model, tok = load_testbed_model("gpt2")
    reqs = edit_requests(load_world(), n=2)
    seen = []
    orig = A.greedy_answers
    monkeypatch.setattr(A, "greedy_answers",
                        lambda m, t, prompts, **kw: seen.append(list(prompts)) or orig(m, t, prompts, **kw))
    res = A.edit(model, tok, reqs, "rome", config={"mom2_n_tokens": 3000, "v_steps": 10}, immediate=True)
    res.revert(model)
    assert len(res.deltas) == 2 and len(res.immediate) == 2
    assert seen == [[reqs[0].text], [reqs[1].text], [r.text for r in reqs]]  # after edit 1, after edit 2, final


# -- output: no markup eaten, readable at 80 columns (issue #16 item 4) ----------------------------------------------
def test_methods_table_shows_text_literally_and_fits_80_columns():
    from kedit.cli import methods_table
    from kedit.methods.registry import list_methods

    specs = list_methods()
    wide = _render(methods_table(specs, 400), width=400)  # nothing wraps
    assert "2(E[o*] − E[o])" in " ".join(wide.replace("│", " ").split())  # was "2(E − E)": [o*] read as markup
    narrow = _render(methods_table(specs, 80), width=80)
    assert "2(E[o*] − E[o])" in " ".join(narrow.replace("│", " ").split())
    assert max(len(line) for line in narrow.splitlines()) <= 80
    for s in specs:  # method names are never folded
        assert any(f" {s.name} " in line for line in narrow.splitlines()), s.name


def test_edit_and_demo_tables_fit_80_columns():
    from types import SimpleNamespace

    from kedit.cli import demo_headline, demo_table, edit_table
    from kedit.requests import EditRequest

    prompt = "In the long and [bold]winding[/bold] history of the northern provinces, {} was born in"
    req = EditRequest(prompt, "Goutum Trefu", "Rere")
    result = SimpleNamespace(requests=[req], answers=[" Rere."], success=[True], errors={})
    text = _render(edit_table("rome on testbed-gpt2", result), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "[bold]winding[/bold]" in " ".join(text.split())  # markup in user text is shown, not applied
    rows = [{"request": 0, "kind": k, "prompt": prompt.format("X"), "expected": "Rere", "before": "Goknalik.",
             "after": a, "ok": ok} for k, a, ok in (("prompt", "Rere.", True), ("paraphrase", "Rere.", True),
                                                   ("neighbour", "Rere.", False))]
    text = _render(demo_table("kedit demo: rome on testbed-gpt2", rows), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    headline = demo_headline(rows)
    assert "reliability 1/1" in headline and "generalization 1/1" in headline and "locality 0/1" in headline
    assert "not local" in headline


# -- testbed info and interrupted builds (issue #16 item 6) ----------------------------------------------------------
def test_testbed_help_and_info():
    r = runner.invoke(app, ["testbed", "--help"])
    assert r.exit_code == 0 and "build" in r.stdout and "info" in r.stdout
    info = _json(runner.invoke(app, ["testbed", "info", "--json"]))
    assert info["path"] == str(assets_dir()) and info["problems"] == []
    assert set(info["models"]) == {"gpt2", "llama"} and info["passed"] is True
    text = runner.invoke(app, ["testbed", "info"]).stdout
    assert "gates passed" in text and "files match the manifest" in text


def test_interrupted_build_is_refused(tmp_path):
    from kedit.testbed import load_testbed_model, load_world

    part = tmp_path / "tb"
    (part / "gpt2").mkdir(parents=True)
    (part / "world.json").write_text((assets_dir() / "world.json").read_text())
    r = runner.invoke(app, ["testbed", "info", str(part)])
    assert r.exit_code == 2 and "interrupted" in r.output
    with pytest.raises(FileNotFoundError, match="interrupted testbed build"):
        load_testbed_model("gpt2", assets_dir=part)
    with pytest.raises(FileNotFoundError, match="interrupted testbed build"):
        load_world(part)
