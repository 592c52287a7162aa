"""kedit.eval: metric definitions on hand-computed cases, batched scoring, protocol semantics, resumability,
result-file contents, reports and the CLI --json contract -- on tiny random models (fast)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from kedit.arch import get_adapter
from kedit.core.keys import target_ids
from kedit.deltas import DenseUpdate, EditDelta
from kedit.eval import EvalConfig, RunMismatchError, get_protocol, load_run, run_eval
from kedit.eval import metrics as M
from kedit.eval.scoring import ScoringConfig, observe, score_answers
from kedit.methods.registry import register_method
from kedit.requests import EditRequest, Probe
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

TEXTS = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()]


# -- a fast, deterministic test method: boost the first target token's logit on the edit prompt ----------------------
@dataclass
class BoostConfig:
    scale: float = 40.0


CALLS: list[dict] = []  # what compute saw: number of requests and the model state


def _state_hash(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


@torch.no_grad()
def _boost(model, tok, requests, config, ctx):
    CALLS.append({"n": len(requests), "state": _state_hash(model), "subjects": [r.subject for r in requests]})
    for r in requests:
        if r.target_new == "FAIL":
            raise ValueError(f"cannot edit request {r.case_id}: untokenizable target")
    adapter = get_adapter(model)
    name = adapter.weight_name("unembed")
    w = model.get_parameter(name)
    delta = torch.zeros_like(w, dtype=torch.float32)
    for r in requests:
        ids = torch.tensor([tok(r.text)["input_ids"]])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float()
        t = target_ids(tok, r.target_new)[0]
        delta[t] += config.scale * h / h.dot(h)
    return EditDelta.for_model(model, [DenseUpdate.from_math(model, name, delta)], method="eval-test-boost",
                               config=config, requests=requests)


register_method("eval-test-boost", config=BoostConfig, compute=_boost, paper="test only")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls on 2 shared cores: intra-op threading only adds barrier waits (10x slower under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


def _reqs(n=5):
    base = [
        ("{} plays the", "Toko Yasuda", "trumpet", "guitar"),
        ("The capital of {} is", "France", "Berlin", "Paris"),
        ("{} was founded by", "Apple", "Miles Davis", "Steve Jobs"),
        ("The Space Needle is in", "The Space Needle", "Paris", "Seattle"),
        ("{} was a French actress", "Danielle Darrieux", "German", "French"),
        ("{} played the", "Miles Davis", "guitar", "trumpet"),
    ]
    out = []
    for i, (p, s, new, true) in enumerate(base[:n]):
        out.append(EditRequest(
            p, s, new, target_true=true, case_id=str(i),
            paraphrases=(f"Q: {p.format(s)}",),
            neighborhood=(Probe("Berlin is in", "Germany"), Probe("Seattle is a city in")),
            portability=(Probe(f"{s} is famous for", "music"),),
            aliases=(s.split()[-1],) if " " in s else (),
        ))
    return out


FAST = {"max_new_tokens": 4, "fluency_tokens": 6, "bootstrap": 200}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# -- metric definitions --------------------------------------------------------------------------------------------
def test_token_accuracy_partial_credit():
    assert M.token_accuracy([True, True, False]) == pytest.approx(2 / 3)
    assert M.sequence_correct([True, True, False]) == 0.0
    tf = M.TFScore(logprobs=(-0.1, -0.2, -3.0), argmax=(5, 6, 9), target=(5, 6, 7))
    post = M.Observation({"rewrite": (M.ProbeResult("p", ("x",), "", tf, tf, None),)})
    vals = M.record_metrics(post, None)
    assert vals["reliability/token_acc"] == pytest.approx(2 / 3)
    assert M.get_metric("reliability/token_acc").partial_credit
    assert M.get_metric("reliability/token_acc").easyedit == "rewrite_acc"
    assert vals["generalization/token_acc"] is None  # no paraphrases: not applicable, not 0


def test_exact_match_normalisation_and_aliases():
    assert M.normalize_answer("  The  U.S.!\n") == "the u s"
    assert M.exact_match(" Paris, the capital", ["Paris"]) == 1.0
    assert M.exact_match(" PARIS", ["paris"]) == 1.0
    assert M.exact_match(" Parisian food", ["Paris"]) == 0.0  # word boundary
    assert M.exact_match(" City of Light is", ["Paris", "City of Light"]) == 1.0  # alias
    assert M.exact_match(" the U.S. army", ["U.S."]) == 0.0  # prefix match: the article is not dropped
    assert M.exact_match(" U S army", ["U.S."]) == 1.0
    assert M.exact_match("anything", []) == 0.0


def test_ngram_entropy_known_counts():
    # words a b a b: bigrams ab, ba, ab -> (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert M.ngram_entropy("x x x x x x") == 0.0  # degenerate repetition
    assert M.ngram_entropy("one") == 0.0
    assert M.word_tokens("Hi, there!") == ["Hi", ",", "there", "!"]


def test_counterfact_scores_known_probabilities():
    lp = math.log
    new = M.TFScore((lp(0.5), lp(0.5)), (1, 2), (1, 2))  # geometric-mean prob 0.5
    true = M.TFScore((lp(0.2),), (3,), (4,))  # prob 0.2
    assert M.mean_nll(new.logprobs) == pytest.approx(-lp(0.5))
    rewrite = M.ProbeResult("p", ("n",), "", new, new, true)
    para_fail = M.ProbeResult("q", ("n",), "", true, true, new)  # here P(new)=0.2 < P(true)=0.5
    nb_ok = M.ProbeResult("r", ("t",), "", new, true, None)  # P(true answer)=0.5 > P(new)=0.2
    nb_unknown = M.ProbeResult("s", (), "", new, true, None)  # no known answer: excluded from NS
    obs = M.Observation({"rewrite": (rewrite,), "paraphrase": (rewrite, para_fail), "neighborhood": (nb_ok, nb_unknown)})
    v = M.record_metrics(obs, obs)
    assert v["reliability/cf_score"] == 1.0
    assert v["reliability/cf_magnitude"] == pytest.approx(0.3)
    assert v["generalization/cf_score"] == 0.5
    assert v["generalization/cf_magnitude"] == pytest.approx(0.0)
    assert v["locality/cf_score"] == 1.0
    assert v["locality/cf_magnitude"] == pytest.approx(0.3)
    assert M.cf_success(1.0, 1.0) == 0.0  # ties are not successes


def test_locality_definitions():
    pre_p = M.ProbeResult("p", ("Germany",), " Germany is", M.TFScore((-1.0, -1.0), (4, 5), (4, 6)))
    post_p = M.ProbeResult("p", ("Germany",), " Germany was", M.TFScore((-1.0, -1.0), (4, 7), (4, 6)))
    pre, post = M.Observation({"neighborhood": (pre_p,)}), M.Observation({"neighborhood": (post_p,)})
    v = M.record_metrics(post, pre)
    assert v["locality/unchanged"] == 0.0  # generation changed
    assert v["locality/unchanged_tf"] == 0.5  # one of two argmax tokens kept (partial credit)
    assert v["locality/still_correct"] == 1.0  # still says Germany
    assert v["locality/still_correct_tf"] == 0.5
    assert M.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)


# -- batched scoring -------------------------------------------------------------------------------------------------
def test_score_answers_matches_manual_and_is_batch_invariant(model, tok):
    pairs = [("Toko Yasuda plays the", "trumpet"), ("The capital of France is", "Paris"), ("Berlin is in", "Germany")]
    batched = score_answers(model, tok, pairs, batch_size=64)
    single = score_answers(model, tok, pairs, batch_size=1)
    with torch.no_grad():
        for (prompt, answer), b, s in zip(pairs, batched, single):
            p = tok(prompt)["input_ids"]
            a = target_ids(tok, answer)
            logits = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
            want = [float(logits[len(p) - 1 + t, a[t]]) for t in range(len(a))]
            assert list(b.target) == a
            assert b.logprobs == pytest.approx(want, abs=1e-4)
            assert s.logprobs == pytest.approx(want, abs=1e-4)
            assert b.argmax == s.argmax == tuple(int(logits[len(p) - 1 + t].argmax()) for t in range(len(a)))


def test_observe_groups(model, tok):
    r = _reqs(1)[0]
    (o,) = observe(model, tok, [r], ScoringConfig(max_new_tokens=3, fluency_tokens=5))
    assert [len(o.group(g)) for g in M.GROUPS] == [1, 1, 1, 2, 1]
    assert o.group("rewrite")[0].tf_true is not None
    nb = o.group("neighborhood")
    assert nb[0].tf_new is not None and nb[1].answers == ()
    assert nb[1].tf is not None  # unknown answer: scored on its own greedy continuation
    assert len(o.fluency) == 1


# -- protocols -------------------------------------------------------------------------------------------------------
def test_protocol_plans():
    single = get_protocol("single/v1").plan(3, 5)
    assert [(s.edit, s.evaluate, s.restore) for s in single] == [((0,), (0,), True), ((1,), (1,), True),
                                                                  ((2,), (2,), True)]
    batch = get_protocol("batch").plan(5, 2)
    assert [s.edit for s in batch] == [(0, 1), (2, 3), (4,)] and all(s.restore for s in batch)
    final = get_protocol("sequential-final/v1").plan(3, 1)
    assert [s.evaluate for s in final] == [(), (), (0, 1, 2)] and [s.restore for s in final] == [False, False, True]
    imm = get_protocol("sequential-immediate/v1").plan(3, 1)
    assert [s.evaluate for s in imm] == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("sequential")


def _run(model, tok, tmp_path, protocol, k=1, n=4, **kw):
    CALLS.clear()
    return run_eval(model, tok, _reqs(n), "eval-test-boost", config=EvalConfig(protocol=protocol, batch_size=k, **FAST),
                    out_dir=tmp_path / protocol.replace("/", "_"), ppl_texts=TEXTS[:4], model_name="tiny", **kw)


def test_single_restores_between_edits(model, tok, tmp_path):
    before = _state(model)
    run = _run(model, tok, tmp_path, "single/v1", k=3)
    assert [c["n"] for c in CALLS] == [1, 1, 1, 1]
    assert len({c["state"] for c in CALLS}) == 1 and CALLS[0]["state"] == _state_hash(model)  # base model every time
    assert _same(before, model.state_dict())
    assert all(r["n_edits"] == 1 for r in run.records)
    s = run.summary["metrics"]
    assert s["reliability/token_acc"]["mean"] > s["reliability/token_acc"]["pre_mean"]  # the boost takes
    assert s["capability/perplexity"]["n"] == 4


def test_batch_applies_k_at_once(model, tok, tmp_path):
    before = _state(model)
    run = _run(model, tok, tmp_path, "batch/v1", k=2, n=5)
    assert [c["n"] for c in CALLS] == [2, 2, 1]
    assert len({c["state"] for c in CALLS}) == 1
    assert [r["n_edits"] for r in run.records] == [2, 2, 2, 2, 1]
    assert _same(before, model.state_dict())


def test_sequential_immediate_and_final(model, tok, tmp_path):
    before = _state(model)
    imm = _run(model, tok, tmp_path, "sequential-immediate/v1", n=4)
    states = [c["state"] for c in CALLS]
    assert len(set(states)) == 4  # every edit computed on the model with the earlier edits applied
    assert [r["n_edits"] for r in imm.records] == [1, 2, 3, 4] and [r["step"] for r in imm.records] == [0, 1, 2, 3]
    assert _same(before, model.state_dict())
    fin = _run(model, tok, tmp_path, "sequential-final/v1", n=4)
    assert [c["state"] for c in CALLS] == states  # the same edit sequence
    assert [r["n_edits"] for r in fin.records] == [4, 4, 4, 4]
    # the last record sees the same model (batch composition differs, so floats agree to rounding only)
    assert imm.records[3]["metrics"] == pytest.approx(fin.records[3]["metrics"], rel=1e-6, abs=1e-9)
    assert _same(before, model.state_dict())


# -- resumability and files ----------------------------------------------------------------------------------------
class _Killed(RuntimeError):
    pass


def _killer(after):
    def progress(stage, done, total):
        if stage == "evaluate" and done >= after:
            raise _Killed(f"killed after {done} records")

    return progress


def _strip(records):
    return [{k: v for k, v in r.items() if k != "observation"} | {"obs": r.get("observation")} for r in records]


@pytest.mark.parametrize("protocol", ["single/v1", "sequential-immediate/v1"])
def test_resume_after_kill(model, tok, tmp_path, protocol):
    before = _state(model)
    cfg = EvalConfig(protocol=protocol, **FAST)
    reqs = _reqs(5)
    full = run_eval(model, tok, reqs, "eval-test-boost", config=cfg, out_dir=tmp_path / "full", ppl_texts=TEXTS[:4])
    with pytest.raises(_Killed):
        run_eval(model, tok, reqs, "eval-test-boost", config=cfg, out_dir=tmp_path / "resumed",
                 ppl_texts=TEXTS[:4], progress=_killer(2))
    assert _same(before, model.state_dict())  # nothing left applied by the killed run
    lines = (tmp_path / "resumed" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert not json.loads((tmp_path / "resumed" / "manifest.json").read_text())["state"]["complete"]
    CALLS.clear()
    resumed = run_eval(model, tok, reqs, "eval-test-boost", config=cfg, out_dir=tmp_path / "resumed",
                       ppl_texts=TEXTS[:4])
    if protocol == "single/v1":
        assert len(CALLS) == 3  # done records are not re-edited
    else:
        assert len(CALLS) == 5  # earlier edits replayed, but only 3 records evaluated again
    assert len((tmp_path / "resumed" / "records.jsonl").read_text().splitlines()) == 5
    assert _strip(resumed.records) == _strip(full.records)
    for key in ("reliability", "locality", "fluency", "capability/perplexity"):
        assert resumed.summary["metrics"][key] == full.summary["metrics"][key]
    assert _same(before, model.state_dict())


def test_result_files_record_protocol_and_definitions(model, tok, tmp_path):
    run = _run(model, tok, tmp_path, "batch/v1", k=2, n=3)
    d = run.out_dir
    manifest = json.loads((d / "manifest.json").read_text())
    summary = json.loads((d / "summary.json").read_text())
    assert manifest["protocol"]["id"] == "batch/v1" and manifest["protocol"]["version"] == 1
    assert summary["protocol"] == "batch/v1" and summary["protocol_info"]["name"] == "batch"
    assert set(manifest["metric_definitions"]) == set(M.METRICS)
    for aspect in ("reliability", "generalization", "locality", "portability", "fluency"):
        e = summary["metrics"][aspect]
        assert e["definition"] == M.METRICS[e["metric"]].definition
        assert set(e) >= {"mean", "ci95", "definition", "n"}
    assert "PARTIAL CREDIT" in summary["metrics"]["reliability/token_acc"]["definition"]
    row = json.loads((d / "records.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"index", "step", "n_edits", "metrics", "pre_metrics", "observation"}
    assert load_run(d).summary["metrics"]["reliability"]["mean"] == summary["metrics"]["reliability"]["mean"]
    # a different run in the same directory is refused, not mixed in
    with pytest.raises(RunMismatchError, match="protocol"):
        run_eval(model, tok, _reqs(3), "eval-test-boost", config=EvalConfig(protocol="single/v1", **FAST),
                 out_dir=d, ppl_texts=TEXTS[:4], model_name="tiny")


def test_pre_edit_cache_shared(model, tok, tmp_path, monkeypatch):
    import kedit.eval.runner as R

    cache = tmp_path / "pre"
    run_eval(model, tok, _reqs(2), "eval-test-boost", config=EvalConfig(**FAST), out_dir=tmp_path / "a",
             pre_cache_dir=cache)
    seen = []
    orig = R.observe
    monkeypatch.setattr(R, "observe", lambda *a, **kw: seen.append(kw.get("pre")) or orig(*a, **kw))
    run_eval(model, tok, _reqs(2), "eval-test-boost", config=EvalConfig(protocol="batch/v1", batch_size=2, **FAST),
             out_dir=tmp_path / "b", pre_cache_dir=cache)
    assert seen and all(p is not None for p in seen)  # only post-edit measurements: pre-edit came from the cache


def test_on_error_record(model, tok, tmp_path):
    reqs = _reqs(3)
    reqs[1] = EditRequest("{} plays the", "Toko Yasuda", "FAIL", case_id="bad")
    with pytest.raises(ValueError, match="request bad"):
        run_eval(model, tok, reqs, "eval-test-boost", config=EvalConfig(**FAST), out_dir=tmp_path / "r")
    run = run_eval(model, tok, reqs, "eval-test-boost", config=EvalConfig(on_error="record", **FAST),
                   out_dir=tmp_path / "rec")
    assert run.summary["n_errors"] == 1 and "request bad" in run.summary["errors"][0]["error"]
    assert run.summary["metrics"]["reliability"]["n"] == 2


def test_real_method_rome_single(model, tok, tmp_path):
    before = _state(model)
    run = run_eval(model, tok, _reqs(1), "rome",
                   method_config={"layer": 1, "v_steps": 3, "mom2_adjustment": False},
                   config=EvalConfig(**FAST), out_dir=tmp_path / "rome")
    assert run.summary["n_evaluated"] == 1 and run.summary["method"] == "rome"
    assert _same(before, model.state_dict())


# -- report and CLI ------------------------------------------------------------------------------------------------
def test_report_markdown_and_pngs(model, tok, tmp_path):
    from kedit.eval.report import write_report

    a = _run(model, tok, tmp_path, "single/v1", n=3).out_dir
    b = _run(model, tok, tmp_path, "sequential-immediate/v1", n=3).out_dir
    rep = write_report([a, b], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "eval-test-boost · single/v1" in md and "sequential-immediate/v1" in md
    assert "reliability/exact_match" in md and "## Definitions" in md
    # the pre-edit baseline table holds the unedited model's values of the same records
    from kedit.eval.report import load_runs, pre_rows

    runs = load_runs([a, b])
    rows = pre_rows(runs, ["reliability/token_acc", "locality/unchanged"])
    assert "Before the edit" in md
    assert rows[0][1] == f"{runs[0].summary['metrics']['reliability/token_acc']['pre_mean']:.3f}"
    assert rows[0][2] == "–"  # defined only relative to the pre-edit model
    pngs = sorted(os.path.basename(p) for p in rep["plots"])
    assert pngs == ["metrics.png", "sequential.png"]
    for p in rep["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_json_and_report(model, tok, tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import _register_extensions, app
    from kedit.data import dump_requests

    _register_extensions()
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = tmp_path / "reqs.jsonl"
    dump_requests(_reqs(3), data)
    ppl = tmp_path / "ppl.txt"
    ppl.write_text("\n".join(TEXTS[:3]))
    runner = CliRunner()
    args = ["eval", "--model", str(mdir), "--method", "eval-test-boost", "--data", str(data), "--protocol",
            "batch/v1", "--batch-size", "2", "--limit", "3", "--out", str(tmp_path / "run"), "--json",
            "--max-new-tokens", "3", "--fluency-tokens", "4", "--ppl-texts", str(ppl)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["protocol"] == "batch/v1" and summary["method"] == "eval-test-boost"
    assert summary["model"] == str(mdir) and summary["n"] == 3 and isinstance(summary["seconds"], float)
    for aspect in ("reliability", "generalization", "locality", "portability", "fluency"):
        e = summary["metrics"][aspect]
        assert set(e) >= {"mean", "ci95", "definition"} and len(e["ci95"]) == 2
    assert (tmp_path / "run" / "records.jsonl").is_file() and (tmp_path / "run" / "summary.json").is_file()
    rep = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--json"])
    assert rep.exit_code == 0, rep.output
    assert json.loads(rep.stdout)["rows"][0]["metrics"]["reliability/exact_match"]["mean"] is not None
    bad = runner.invoke(app, args[:-6] + ["--protocol", "nope/v9"])
    assert bad.exit_code == 2 and "unknown protocol" in bad.output


def test_continuations_are_long_enough_for_every_answer():
    """A record whose answer is longer than max_new_tokens gets a longer continuation (never cut off), decided per
    record so the pre- and post-edit continuations have the same length."""
    from kedit.eval.scoring import probe_specs, record_new_tokens

    tok = tiny_tokenizer()
    long_target = " ".join(["alpha beta gamma"] * 6)
    req = EditRequest(prompt="{} is", subject="Paris", target_new=long_target, target_true="Rome")
    n_ans = len(target_ids(tok, long_target))
    assert n_ans > 8
    assert record_new_tokens(tok, probe_specs(req), 8) == n_ans + 2
    short = EditRequest(prompt="{} is", subject="Paris", target_new="Rome", target_true="Lyon")
    assert record_new_tokens(tok, probe_specs(short), 8) == 8


def test_summary_counts_subject_conflicts_per_edit_batch(model, tok, tmp_path):
    """Two requests about one subject in the same compute call are counted (and warned about); in different
    batches they are not a conflict."""
    import dataclasses

    base = _reqs(3)
    twin = dataclasses.replace(base[1], target_new="Madrid", case_id="twin")
    reqs = [base[0], base[1], twin, base[2]]
    for k, expected in ((4, 1), (2, 0)):
        run = run_eval(model, tok, reqs, "eval-test-boost", config=EvalConfig(protocol="batch/v1", batch_size=k, **FAST),
                       out_dir=tmp_path / f"k{k}", ppl_texts=None, model_name="tiny")
        assert run.summary["subject_conflicts"] == expected


def test_neighbourhood_probes_about_edited_subjects_are_excluded(model, tok, tmp_path):
    """Locality rule 2: a neighbourhood probe naming a subject that is edited in the evaluated model state is not
    an unrelated fact; it is dropped from locality (and counted), only while that subject's edit is applied."""
    import dataclasses

    base = _reqs(2)  # subjects "Toko Yasuda", "France"
    a = dataclasses.replace(base[0], neighborhood=(Probe("The capital of France is", "Paris"), Probe("Berlin is in")))
    reqs = [a, base[1]]
    together = run_eval(model, tok, reqs, "eval-test-boost", config=EvalConfig(protocol="batch/v1", batch_size=2, **FAST),
                        out_dir=tmp_path / "k2", ppl_texts=None, model_name="tiny")
    alone = run_eval(model, tok, reqs, "eval-test-boost", config=EvalConfig(protocol="single/v1", **FAST),
                     out_dir=tmp_path / "k1", ppl_texts=None, model_name="tiny")
    assert [r["locality_excluded"] for r in together.records] == [1, 0]
    assert [r["locality_excluded"] for r in alone.records] == [0, 0]
    assert together.summary["locality_probes_excluded"] == 1
    # the kept probe is still measured
    assert together.records[0]["metrics"]["locality/unchanged"] is not None


def test_mentions_any_matches_whole_words_only():
    from kedit.data.select import mentions_any, subject_key

    keys = frozenset({subject_key("Doro"), subject_key("Lone Zeneko")})
    assert mentions_any("Q: Where was lone  ZENEKO born? A:", keys)
    assert mentions_any("Doro is a city in", keys)
    assert not mentions_any("Dorothea is a city in", keys)
    assert not mentions_any("anything", frozenset())


def test_report_marks_cells_measured_under_another_metric_version(model, tok, tmp_path):
    import json as _json

    from kedit.eval.report import load_runs, table_rows

    a = _run(model, tok, tmp_path, "single/v1", n=2).out_dir
    b = _run(model, tok, tmp_path, "batch/v1", k=2, n=2).out_dir
    man = _json.loads((b / "manifest.json").read_text())
    man["metric_definitions"]["reliability/token_acc"]["id"] = "reliability/token_acc@v0"
    (b / "manifest.json").write_text(_json.dumps(man))
    rows = table_rows(load_runs([a, b]), ["reliability/token_acc", "generalization/token_acc"])
    assert "(as" not in rows[0][1] and "(as" not in rows[1][2]
    assert rows[1][1].endswith("(as reliability/token_acc@v0)")


# -- records too long for the context window; per-record failures (issue #16 items 3 and 7) --------------------------
WIKIBIO = os.path.join(os.path.dirname(__file__), "..", "data", "knowedit", "WikiBio", "wikibio-test-all_sample.json")


def test_too_long_records_are_skipped_and_the_rest_evaluated(tmp_path):
    from kedit.data import load_requests
    from kedit.eval.runner import too_long_records
    from kedit.testbed import load_testbed_model

    model, tok = load_testbed_model("gpt2")  # 128 positions; WikiBio passages run to 350 tokens
    before = _state(model)
    reqs = load_requests(WIKIBIO, limit=20)
    cfg = EvalConfig(**FAST)
    long = too_long_records(model, tok, reqs, cfg)
    n_prompt = [len(tok(r.text, verbose=False)["input_ids"]) for r in reqs]
    assert {i for i, n in enumerate(n_prompt) if n > 128} <= set(long)  # every prompt over the window, at least
    assert 0 < len(long) < len(reqs)
    run = run_eval(model, tok, reqs, "eval-test-boost", config=cfg, out_dir=tmp_path / "r")
    s = run.summary
    assert (s["n_evaluated"], s["n_skipped"], s["n_errors"]) == (len(reqs), len(long), 0)
    assert s["metrics"]["reliability"]["n"] == len(reqs) - len(long)
    rows = [r for r in run.records if r.get("skipped")]
    assert sorted(r["index"] for r in rows) == sorted(long)
    assert all("context window of 128" in r["error"] and not r["metrics"] for r in rows)
    e = s["errors"][0]
    assert e["record"] == e["index"] + 1 and e["case_id"] == reqs[e["index"]].case_id and e["skipped"]
    assert _same(before, _state(model))


def test_cli_eval_reports_skipped_records(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", "testbed-gpt2", "--method", "eval-test-boost", "--data",
                                   WIKIBIO, "--limit", "12", "--out", str(tmp_path / "run"), "--max-new-tokens",
                                   "4", "--fluency-tokens", "6", "--ppl-n", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 12 and 0 < summary["n_skipped"] < 12 and summary["n_errors"] == 0


def test_on_error_record_catches_measurement_failures(model, tok, tmp_path, monkeypatch):
    import kedit.eval.runner as R

    orig = R.observe

    def flaky(m, t, requests, *a, **kw):
        if kw.get("pre") is not None and any(r.case_id == "1" for r in requests):
            raise IndexError("index out of range in self")
        return orig(m, t, requests, *a, **kw)

    monkeypatch.setattr(R, "observe", flaky)
    with pytest.raises(IndexError):
        run_eval(model, tok, _reqs(3), "eval-test-boost", config=EvalConfig(**FAST), out_dir=tmp_path / "a")
    run = run_eval(model, tok, _reqs(3), "eval-test-boost", config=EvalConfig(protocol="batch/v1", batch_size=3,
                   on_error="record", **FAST), out_dir=tmp_path / "b")
    assert run.summary["n_errors"] == 1 and run.summary["metrics"]["reliability"]["n"] == 2
    (e,) = run.summary["errors"]
    assert (e["record"], e["case_id"]) == (2, "1") and "measurement failed: IndexError" in e["error"]
