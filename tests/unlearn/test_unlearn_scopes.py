"""KnowUnDo scopes on the testbed (the privacy analogue): the unlearn scope is the private facts of the forgotten
persons, the retention scope their public facts; token accuracy and perplexity per scope equal a one-item-at-a-time
recomputation; the metric runs on the KnowUnDo file format; ``kedit unlearn --json`` reports both scopes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kedit.core.keys import target_ids
from kedit.testbed import load_testbed_model
from kedit.unlearn.loaders import load_forget_spec
from kedit.unlearn.metrics import scope_metrics
from kedit.unlearn.splits import PRIVATE_RELATIONS, PUBLIC_RELATIONS, forget_persons
from kedit.unlearn.splits import testbed_scope_split as make_scope_split

DATA = Path(__file__).resolve().parents[1] / "data" / "unlearn"


@pytest.fixture(scope="module")
def gpt2():
    return load_testbed_model("gpt2")


def test_scope_split_is_private_vs_public_facts_of_the_same_persons():
    from kedit.testbed import load_world

    sp = make_scope_split("privacy10")
    persons = set(forget_persons(load_world(), "forget10"))
    assert {q.subject for q in sp.forget} == persons == {q.subject for q in sp.retain}
    assert {q.relation for q in sp.forget} == set(PRIVATE_RELATIONS)
    assert {q.relation for q in sp.retain} == set(PUBLIC_RELATIONS)
    assert len(sp.forget) == len(sp.retain) == 3 * len(persons) == 72
    assert sp.scopes["unlearn"] is sp.forget and sp.scopes["retention"] is sp.retain
    assert load_forget_spec("testbed:privacy01").info["unlearn_scope"] == 6
    with pytest.raises(ValueError, match="unknown scope split"):
        make_scope_split("privacy42")


def _one_by_one(model, tok, items):
    correct = count = first = 0
    logp = 0.0
    for it in items:
        q = tok(it.question)["input_ids"]
        a = target_ids(tok, it.answer)
        seq = (q + a)[: model.config.n_positions]
        with torch.no_grad():
            lg = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        for t, y in enumerate(a[: len(seq) - len(q)]):
            row = lg[len(q) - 1 + t]
            correct += int(int(row.argmax()) == y)
            first += int(int(row.argmax()) == y) if t == 0 else 0
            logp += float(row[y])
            count += 1
    return correct / count, math.exp(-logp / count), first / len(items)


def test_scope_metrics_equal_a_one_item_at_a_time_recomputation(gpt2):
    model, tok = gpt2
    sp = make_scope_split("privacy01")
    for items in (sp.forget, sp.retain, sp.extra["world"][:7]):
        m = scope_metrics(model, tok, items, batch_size=4)
        acc, ppl, first = _one_by_one(model, tok, items)
        assert m["token_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert m["first_token_accuracy"] == pytest.approx(first, abs=1e-12)
        assert m["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert scope_metrics(model, tok, sp.retain)["token_accuracy"] > 0.5  # the trained model knows its public facts
    with pytest.raises(ValueError, match="empty scope"):
        scope_metrics(model, tok, [])


def test_scope_metrics_on_the_knowundo_format(gpt2):
    model, tok = gpt2
    sp = load_forget_spec(str(DATA / "knowundo_privacy_unlearn_val_head3.json"),
                          retain=str(DATA / "knowundo_privacy_retention_val_head3.json"))
    assert set(sp.scopes) == {"unlearn", "retention"}
    for items in sp.scopes.values():
        m = scope_metrics(model, tok, items)
        assert 0.0 <= m["token_accuracy"] <= 1.0 and m["perplexity"] > 1.0 and m["tokens"] > 10
        acc, ppl, _ = _one_by_one(model, tok, items)
        assert m["token_accuracy"] == pytest.approx(acc) and m["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_cli_json_reports_both_scopes_before_and_after(tmp_path):
    from kedit.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["unlearn", "--model", "testbed-gpt2", "--method", "memflex", "--forget",
                                   "testbed:privacy01", "--out", str(out), "--set", "max_steps=2", "--eval-size", "4",
                                   "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout.strip().splitlines()[-1])["metrics"]
    for scope in ("unlearn", "retention"):
        assert 0.0 <= m[f"{scope}_token_accuracy"] <= 1.0 and m[f"{scope}_perplexity"] >= 1.0
        assert 0.0 <= m[f"{scope}_token_accuracy_before"] <= 1.0
    assert m["retention_accuracy_kept"] == pytest.approx(
        m["retention_token_accuracy"] / m["retention_token_accuracy_before"])
    assert "forget_quality" not in m  # no retain model for a scope split
