"""lifelong/v1: the plan, the stream with re-edits, the fixed locality probes, retention, newest-wins, the JSON
shape, resumption and option checks -- on testbed-gpt2 with tiny streams (T = 6 or 12)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from kedit.arch import get_adapter
from kedit.core.context import EditContext
from kedit.core.keys import target_ids
from kedit.data.select import mentions_any, subject_key
from kedit.deltas import DenseUpdate, EditDelta
from kedit.eval import EvalConfig, get_protocol, load_run, run_eval
from kedit.eval import lifelong as L
from kedit.eval import runner as R
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

FAST = {"max_new_tokens": 4, "fluency_tokens": 0, "bootstrap": 50, "locality_probes": 16}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    from kedit.testbed import load_world

    return load_world()


@pytest.fixture(scope="module")
def mt():
    from kedit.testbed import load_testbed_model

    return load_testbed_model("gpt2")


@pytest.fixture(scope="module")
def reqs(world):
    from kedit.testbed import edit_requests

    return edit_requests(world, n=40)


def _kw(world):
    return {"locality_facts": L.testbed_locality_facts(world), "reedit_targets": L.testbed_reedit_targets(world),
            "ppl_texts": list(world.filler[:6])}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# -- a fast test method: boost the first target token's logit on the edit prompt; extra["undo"] undoes everything --
@dataclass
class BoostConfig:
    scale: float = 40.0


BASE: dict[str, torch.Tensor] = {}


@torch.no_grad()
def _boost(model, tok, requests, config, ctx):
    name = get_adapter(model).weight_name("unembed")
    w = model.get_parameter(name)
    BASE.setdefault("w", w.detach().clone())
    delta = torch.zeros_like(w, dtype=torch.float32)
    for r in requests:
        if (r.extra or {}).get("undo"):  # an edit that undoes every earlier one (back to the base weights)
            delta += BASE["w"].float() - w.float()
            continue
        ids = torch.tensor([tok(r.text)["input_ids"]])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float()
        delta[target_ids(tok, r.target_new)[0]] += config.scale * h / h.dot(h)
    return EditDelta.for_model(model, [DenseUpdate.from_math(model, name, delta)], method="ll-test-boost",
                               config=config, requests=requests)


register_method("ll-test-boost", config=BoostConfig, compute=_boost, paper="test only")


# -- plan and stream ------------------------------------------------------------------------------------------------
def test_plan_cuts_chunks_at_checkpoints():
    p = get_protocol("lifelong/v1")
    steps = p.plan(12, 5, (3, 6, 12))
    assert [s.edit for s in steps] == [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9, 10), (11,)]
    assert [s.checkpoint for s in steps] == [3, 6, None, 12]
    assert steps[1].evaluate == tuple(range(6)) and steps[2].evaluate == ()
    assert [s.restore for s in steps] == [False, False, False, True]
    assert [s.edit for s in p.plan(4, 1, (2, 4))] == [(0,), (1,), (2,), (3,)]
    for bad, msg in (((3, 3), "increasing"), ((0, 4), "positive"), ((4, 13), "more edits"), ((), "at least one")):
        with pytest.raises(ValueError, match=msg):
            p.plan(12, 1, bad)
    with pytest.raises(ValueError, match="last checkpoint"):
        p.plan(12, 1, (3, 6))
    with pytest.raises(ValueError, match="reedit_rate"):
        EvalConfig(protocol="lifelong/v1", reedit_rate=0.5)
    with pytest.raises(ValueError, match="increasing"):
        EvalConfig(protocol="lifelong/v1", checkpoints=(5, 2))
    assert L.default_checkpoints(1564) == (10, 100, 300, 1000) and L.default_checkpoints(50) == (10, 50)


def test_stream_reedits_at_rate_with_new_targets(reqs, world):
    targets = L.testbed_reedit_targets(world)
    k = 3
    stream = L.make_stream(reqs, 40, 0.1, k=k, seed=0, targets=targets)
    assert stream == L.make_stream(reqs, 40, 0.1, k=k, seed=0, targets=targets)  # deterministic
    assert stream != L.make_stream(reqs, 40, 0.1, k=k, seed=1, targets=targets)
    re = [i for i, r in enumerate(stream) if (r.extra or {}).get("reedit_of") is not None]
    assert len(stream) == 40 and len(re) == 4
    fresh = [r for r in stream if (r.extra or {}).get("reedit_of") is None]
    assert fresh == list(reqs[:36])  # the first records, in order
    for i in re:
        r = stream[i]
        first = [j for j in range(i) if L.fact_key(stream[j]) == L.fact_key(r)]
        assert len(first) == 1 and i - first[0] >= k  # never in the same compute call as its earlier edit
        orig = stream[first[0]]
        assert (r.subject, r.prompt, r.target_true) == (orig.subject, orig.prompt, orig.target_true)
        assert r.target_new not in (orig.target_new, orig.target_true)
        assert r.target_new in targets[r.extra["relation"]] and r.extra["earlier_targets"] == [orig.target_new]
        assert r.portability == ()
    assert len({L.fact_key(stream[i]) for i in re}) == 4  # each fact re-edited at most once
    assert L.make_stream(reqs, 20, 0.0) == list(reqs[:20])
    with pytest.raises(ValueError, match="records give only"):
        L.make_stream(reqs[:5], 10, 0.1)


def test_locality_probes_fixed_and_disjoint_from_edited_subjects(reqs, world):
    stream = L.make_stream(reqs, 40, 0.1, seed=0)
    probes, pool = L.choose_probes(L.testbed_locality_facts(world), stream, 50, seed=0)
    assert len(probes) == 50 and pool > 50
    assert probes == L.choose_probes(L.testbed_locality_facts(world), stream, 50, seed=0)[0]
    edited = frozenset(subject_key(r.subject) for r in stream)
    assert not any(mentions_any(p.prompt, edited) for p in probes)
    assert all(p.answer for p in probes) and len({p.prompt for p in probes}) == 50


# -- runs ---------------------------------------------------------------------------------------------------------
def _cfg(cps, **kw):
    return EvalConfig(protocol="lifelong/v1", checkpoints=cps, **{**FAST, **kw})


def test_retention_sees_an_earlier_edit_undone(mt, world, reqs):
    model, tok = mt
    BASE.clear()
    data = list(reqs[:5]) + [EditRequest("{} is", "Zzz", "x", case_id="undo", extra={"undo": True})]
    run = run_eval(model, tok, data, "ll-test-boost", config=_cfg((3, 6), reedit_rate=0.0), **_kw(world))
    rows = {(r["checkpoint"], r["case_id"]): r for r in run.records}
    at3 = [rows[(3, str(i))] for i in range(3)]
    assert sum(r["metrics"]["reliability/token_acc"] > r["pre_metrics"]["reliability/token_acc"] for r in at3) >= 2
    # at 6 every earlier fact is evaluated again (retention): the undo brought each back to its pre-edit value
    at6 = [rows[(6, str(i))] for i in range(5)]
    for r in at6:
        assert r["metrics"]["reliability/token_acc"] == pytest.approx(r["pre_metrics"]["reliability/token_acc"])
    c3, c6 = (c["metrics"]["reliability/token_acc"]["mean"] for c in run.summary["checkpoints"])
    assert c6 < c3 and run.summary["checkpoints"][1]["n_facts"] == 6


def test_newest_wins_by_hand(mt, world, reqs, monkeypatch):
    """Three facts re-edited (from the data): scripted answers -- the newest target, the earlier one, neither."""
    model, tok = mt
    a, b, c = reqs[0], reqs[1], reqs[2]
    targets = L.testbed_reedit_targets(world)
    new = {r.text: next(t for t in targets[r.extra["relation"]] if t not in (r.target_new, r.target_true))
           for r in (a, b, c)}
    data = [a, b, c, reqs[3], *(dataclasses.replace(r, target_new=new[r.text]) for r in (a, b, c))]
    script = {a.text: new[a.text] + ".", b.text: b.target_new + ".", c.text: "something else"}
    real = R.observe

    def scripted(model, tok, requests, config, *, pre=None, perplexity=None):
        obs = real(model, tok, requests, config, pre=pre, perplexity=perplexity)
        out = []
        for r, o in zip(requests, obs):
            if pre is not None and r.text in script and r.target_new == new[r.text]:
                rw = dataclasses.replace(o.groups["rewrite"][0], generation=script[r.text])
                o = dataclasses.replace(o, groups={**o.groups, "rewrite": (rw,)})
            out.append(o)
        return out

    monkeypatch.setattr(R, "observe", scripted)
    run = run_eval(model, tok, data, "ll-test-boost", config=_cfg((4, 7), reedit_rate=0.0), **_kw(world))
    m = run.summary["metrics"]
    assert m["reedit/newest_wins"]["n"] == 3 and m["reedit/newest_wins"]["mean"] == pytest.approx(1 / 3)
    assert m["reedit/stale"]["mean"] == pytest.approx(1 / 3)
    assert m["reedit"]["mean"] == m["reedit/newest_wins"]["mean"]
    assert run.summary["checkpoints"][0]["metrics"]["reedit"]["mean"] is None  # no re-edit before 4
    # each fact once, by its newest request: 4 facts at the last checkpoint
    last = [r for r in run.records if r["checkpoint"] == 7]
    assert sorted(r["case_id"] for r in last) == sorted([a.case_id, b.case_id, c.case_id, reqs[3].case_id])
    assert {r["case_id"]: r["index"] for r in last}[a.case_id] == 4


def test_grace_json_shape_and_bitwise_restore(mt, world, reqs, tmp_path):
    model, tok = mt
    before = _state(model)
    run = run_eval(model, tok, reqs[:12], "grace", config=_cfg((3, 6, 12), reedit_rate=0.25),
                   out_dir=tmp_path / "g", **_kw(world))
    s = run.summary
    assert [c["n_edits"] for c in s["checkpoints"]] == [3, 6, 12]
    assert s["metrics"] == s["checkpoints"][-1]["metrics"]
    assert s["stream"]["n_reedits"] == 3 and s["stream"]["locality_probes"] == 16
    for c in s["checkpoints"]:
        m = c["metrics"]
        assert m["locality"]["metric"] == "locality/untouched_unchanged" and m["locality"]["n"] == 16
        assert m["cost/memory_bytes"]["mean"] > 0 and m["cost/seconds_per_edit"]["mean"] > 0
        assert m["reliability"]["n"] == c["n_facts"]
    assert s["checkpoints"][0]["metrics"]["reliability"]["mean"] > 0.5  # GRACE holds its first edits
    mem = [c["metrics"]["cost/memory_bytes"]["mean"] for c in s["checkpoints"]]
    assert mem == sorted(mem) and mem[0] < mem[-1]
    assert "reedit" in s["metrics"] and s["metrics"]["reedit"]["n"] == s["checkpoints"][-1]["n_reedited"] == 3
    assert _same(before, model.state_dict()) and not L.memory_bytes(model)
    again = load_run(tmp_path / "g")
    assert again.summary["checkpoints"] == json.loads(json.dumps(s["checkpoints"]))


class _Killed(Exception):
    pass


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("observation",)} for r in rows]


def test_resume_after_interruption_matches_uninterrupted(mt, world, reqs, tmp_path):
    model, tok = mt
    before = _state(model)
    cfg = _cfg((3, 6, 12), reedit_rate=0.25)
    full = run_eval(model, tok, reqs[:12], "grace", config=cfg, out_dir=tmp_path / "full", **_kw(world))

    def killer(stage, done, total):
        if stage == "edit" and done == 8:
            raise _Killed

    with pytest.raises(_Killed):
        run_eval(model, tok, reqs[:12], "grace", config=cfg, out_dir=tmp_path / "res", progress=killer,
                 **_kw(world))
    assert _same(before, model.state_dict())
    assert len((tmp_path / "res" / "checkpoints.jsonl").read_text().splitlines()) == 2
    part = load_run(tmp_path / "res")
    assert not part.summary["complete"] and [c["n_edits"] for c in part.summary["checkpoints"]] == [3, 6]
    resumed = run_eval(model, tok, reqs[:12], "grace", config=cfg, out_dir=tmp_path / "res", **_kw(world))

    def no_cost(ms):
        return {k: v for k, v in ms.items() if not k.startswith("cost/")}

    assert [no_cost(c["metrics"]) for c in resumed.summary["checkpoints"]] == \
        [no_cost(c["metrics"]) for c in full.summary["checkpoints"]]
    assert _strip(resumed.records) == _strip(full.records)
    assert _same(before, model.state_dict())


@pytest.mark.parametrize("method,sets", [("ft-m", {"layers": [1], "epochs": 2, "lr": 1e-2}),
                                         ("rome", {"layer": 1, "v_steps": 5, "mom2_n_tokens": 600})])
def test_weight_methods_run_lifelong(mt, world, reqs, method, sets):
    from kedit.testbed import corpus

    model, tok = mt
    before = _state(model)
    ctx = EditContext(corpus=corpus(world, n=200), corpus_id="ll-test")
    run = run_eval(model, tok, reqs[:6], method, method_config=sets, config=_cfg((3, 6), batch_size=2),
                   ctx=ctx, **_kw(world))
    s = run.summary
    assert [c["n_edits"] for c in s["checkpoints"]] == [3, 6] and s["stream"]["n_reedits"] == 1
    assert s["metrics"]["cost/memory_bytes"]["mean"] > 0  # base copies of the edited weights
    assert s["metrics"]["capability/perplexity"]["mean"] > 1
    assert _same(before, model.state_dict())


def test_cli_lifelong_json_and_bad_options(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import _register_extensions, app

    _register_extensions()
    runner = CliRunner()
    base = ["eval", "--method", "grace", "--data", "testbed:0-6", "--protocol", "lifelong/v1",
            "--out", str(tmp_path / "run"), "--max-new-tokens", "4", "--fluency-tokens", "0", "--ppl-n", "4"]
    # refused before the model loads (the model does not exist)
    for extra, msg in ((["--checkpoints", "4,2"], "increasing"), (["--checkpoints", "0,3"], "positive"),
                       (["--checkpoints", "3,7"], "more edits"), (["--reedit-rate", "0.6"], "reedit_rate"),
                       (["--checkpoints", "a,b"], "comma-separated"),
                       (["--checkpoints", "3", "--protocol", "single/v1"], "lifelong/v1 only")):
        res = runner.invoke(app, base + ["--model", "no-such-model-xyz"] + extra)
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)
    res = runner.invoke(app, base + ["--model", "testbed-gpt2", "--checkpoints", "3,6", "--json",
                                     "--locality-probes", "8"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert [c["n_edits"] for c in s["checkpoints"]] == [3, 6]
    assert s["metrics"] == s["checkpoints"][-1]["metrics"] and "mean" in s["metrics"]["reedit"]
    assert s["stream"]["locality_probes"] == 8
    rep = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "rep" / "lifelong.png").is_file()
    assert "## Lifelong" in (tmp_path / "rep" / "report.md").read_text()
