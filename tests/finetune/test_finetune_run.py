"""Forgetting-aware fine-tuning runs on testbed-gpt2 (a few steps each): every regulariser ends in a low-rank kedit
delta that reverts bitwise and leaves the original untouched; SI's importances come from the phase-1 loop and EWC's
from a Fisher pass; the new domain never reuses an old name; bad input is refused with nothing written; the CLI's
--json contract."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kedit.deltas import LowRankUpdate, load_delta
from kedit.finetune.domain import new_domain, old_world_probes, phase1_texts
from kedit.finetune.run import FinetuneConfig, finetune
from kedit.fingerprint import model_fingerprint
from kedit.testbed import load_testbed_model, load_world
from kedit.testbed.world import all_names

SMALL = {"phase2_epochs": 1.0, "batch_size": 8, "lora_rank": 2, "fisher_samples": 8}


@pytest.fixture(scope="module")
def gpt2():
    return load_testbed_model("gpt2")


@pytest.fixture(scope="module")
def data():
    world = load_world()
    return world, phase1_texts(world, 32), new_domain(world, 2).sentences[:32]


def test_new_domain_is_deterministic_and_new():
    world = load_world()
    d = new_domain(world, 5)
    assert d == new_domain(world, 5) and d.persons != new_domain(world, 5, seed=2).persons
    old = [n.lower() for n in all_names(world)]
    assert not any(w.lower() in o or o in w.lower() for p in d.persons for w in p.split() for o in old)
    assert len(d.probes) == len(d.sentences) and all(f"{p} {o}." in d.sentences for p, o in d.probes)
    assert len(old_world_probes(world, 10)) == 10
    with pytest.raises(ValueError, match="at least one person"):
        new_domain(world, 0)


@pytest.mark.parametrize("reg", ["si", "ewc", "ewc-ab", "none"])
def test_every_regulariser_gives_a_delta_that_reverts_bitwise(gpt2, data, reg, tmp_path):
    model, tok = gpt2
    _, p1, p2 = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    res = finetune(model, tok, p1, p2, {"regularize": reg, **SMALL})
    assert model_fingerprint(model) == fp  # the original is not changed
    assert res.delta.updates and all(isinstance(u, LowRankUpdate) and u.rank == 2 for u in res.delta.updates)
    assert res.log["phase1"]["steps"] == 4 and res.log["phase2"]["steps"] == 4
    if reg == "none":
        assert res.importance is None and "importance" not in res.log
    else:
        imp = res.importance
        assert imp.kind == reg and res.log["importance"]["state_bytes"] == imp.nbytes()
        n = res.log["lora_parameters"]
        if reg == "ewc":  # EWC-LoRA: one full-size Fisher per adapted matrix, the LoRA factors as the anchor
            full = sum(model.get_submodule(p).weight.numel() for p in imp.weights)
            assert sum(w.numel() for w in imp.weights.values()) == full > n and imp.nbytes() == 4 * (full + n)
        else:
            assert sum(w.numel() for w in imp.weights.values()) == n and imp.nbytes() == 2 * 4 * n
        assert all(bool((w >= 0).all()) for w in imp.weights.values())
    if reg == "si":
        assert set(res.log["layer_coefficients"]) == {str(i) for i in range(6)}
        assert sum(res.log["layer_coefficients"].values()) == pytest.approx(1.0, abs=1e-3)
    res.delta.apply(model)
    assert model_fingerprint(model) != fp
    res.delta.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.delta.save(tmp_path / "d")
    again = load_delta(tmp_path / "d")
    again.apply(model)
    again.revert(model)
    assert model_fingerprint(model) == fp


def test_bad_input_is_refused(gpt2, data):
    model, tok = gpt2
    _, p1, p2 = data
    fp = model_fingerprint(model)
    with pytest.raises(ValueError, match="unknown regulariser"):
        finetune(model, tok, p1, p2, {"regularize": "l2"})
    with pytest.raises(ValueError, match="unknown fine-tuning setting"):
        finetune(model, tok, p1, p2, {"lambda": 3})
    with pytest.raises(ValueError, match="layer_coeff"):
        finetune(model, tok, p1, p2, {"layer_coeff": "sometimes"})
    with pytest.raises(ValueError, match="do not exist"):
        finetune(model, tok, p1, p2, {"lora_targets": ("no_such_proj",)})
    with pytest.raises(ValueError, match="phase 2 has no text"):
        finetune(model, tok, p1, [], FinetuneConfig())
    with pytest.raises(ValueError, match="weight must be"):
        finetune(model, tok, p1, p2, {"weight": -1.0})
    assert model_fingerprint(model) == fp


def test_cli_json_contract_and_errors(tmp_path):
    from kedit.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "finetune",
        "--model",
        "testbed-gpt2",
        "--regularize",
        "si",
        "--phase1-texts",
        "32",
        "--new-persons",
        "1",
        "--old-probes",
        "16",
        "--set",
        "phase2_epochs=1",
        "--set",
        "lora_rank=2",
        "--json",
    ]
    res = runner.invoke(app, args + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["regularize"] == "si" and rec["train"]["importance"]["kind"] == "si"
    m = rec["metrics"]
    assert {"forgetting", "learning", "old_recall_after", "new_recall_after"} <= set(m)
    assert m["forgetting"] == pytest.approx(m["old_recall_before"] - m["old_recall_after"])
    assert (out / "finetune.json").is_file() and load_delta(out / "delta").method == "finetune/si"
    bad = runner.invoke(
        app, ["finetune", "--model", "testbed-gpt2", "--regularize", "l2", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "unknown regulariser" in bad.output and not (tmp_path / "x").exists()
    again = runner.invoke(app, args + ["--out", str(out)])
    assert again.exit_code == 2 and "not an empty directory" in again.output
    other = runner.invoke(app, ["finetune", "--model", str(tmp_path), "--out", str(tmp_path / "y")])
    assert other.exit_code == 2 and "not a testbed model" in other.output and not (tmp_path / "y").exists()


def test_lm_loss_equals_the_models_own_causal_lm_loss(gpt2, caplog):
    """Our loss (computed from the logits, so transformers' loss look-up never runs or warns) is the model's own
    ``labels=`` loss on a padded batch."""
    import logging

    from kedit.finetune.run import _batch, _lm_loss

    model, tok = gpt2
    rows = [tok("Alice lives in Paris.")["input_ids"], tok("Bob.")["input_ids"]]
    batch = _batch(rows, tok.pad_token_id or 0, "cpu")
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        ours = _lm_loss(model, batch)
        assert not any("loss_type" in r.getMessage() for r in caplog.records)
        theirs = model(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6)
