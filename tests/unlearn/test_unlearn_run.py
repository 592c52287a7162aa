"""Unlearning runs on testbed-gpt2 (a few optimiser steps each): every method ends in a kedit delta that reverts
bitwise and leaves the original untouched; GA raises the forget NLL; LoRA gives low-rank updates; RMU trains only
its MLP output weights; bad input is refused; the CLI's --json contract and protocol unlearn/v1."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kedit.deltas import DenseUpdate, LowRankUpdate, load_delta
from kedit.eval.protocols import get_protocol
from kedit.fingerprint import model_fingerprint
from kedit.testbed import assets_dir
from kedit.unlearn.methods import get_unlearn_method, list_unlearn_methods
from kedit.unlearn.methods.base import ForgetRetainData, collate
from kedit.unlearn.methods.losses import token_mean_nll
from kedit.unlearn.run import unlearn
from kedit.unlearn.splits import UnlearnSplit


def _forget_nll(model, tok, split):
    batch = collate(tok.eos_token_id)([ForgetRetainData(tok, split.forget, [], seed=0, max_length=64)[i]
                                       for i in range(len(split.forget))])
    with torch.no_grad():
        logits = model(input_ids=batch["forget_input_ids"], attention_mask=batch["forget_attention_mask"]).logits
    return float(token_mean_nll(logits, batch["forget_labels"]))


def test_registry_lists_the_methods():
    assert {s.name for s in list_unlearn_methods()} >= {"grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "rkld"}
    assert get_unlearn_method("GA").name == "grad_ascent"
    with pytest.raises(ValueError, match="unknown unlearning method"):
        get_unlearn_method("forgetall")


def test_grad_ascent_delta_reverts_bitwise_and_raises_forget_nll(gpt2, split, tmp_path):
    model, tok = gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    nll0 = _forget_nll(model, tok, split)
    res = unlearn(model, tok, split, "grad_ascent", {"max_steps": 3, "lr": 1e-3, "batch_size": 4})
    assert model_fingerprint(model) == fp  # training happened on a copy
    assert all(isinstance(u, DenseUpdate) for u in res.delta.updates)
    assert res.delta.method == "unlearn/grad_ascent" and res.delta.meta["unlearn"]["forget_items"] == 12
    assert res.log["train"]["steps"] == 3
    res.delta.apply(model)
    assert _forget_nll(model, tok, split) > nll0 + 0.05
    res.delta.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.delta.save(tmp_path / "d")
    again = load_delta(tmp_path / "d")
    again.apply(model)
    assert _forget_nll(model, tok, split) > nll0 + 0.05
    again.revert(model)
    assert model_fingerprint(model) == fp


def test_lora_variant_gives_low_rank_updates(gpt2, split):
    model, tok = gpt2
    fp = model_fingerprint(model)
    res = unlearn(model, tok, split, "grad_diff", {"max_steps": 2, "lr": 1e-3, "lora": True, "lora_rank": 4})
    assert res.delta.updates and all(isinstance(u, LowRankUpdate) and u.rank == 4 for u in res.delta.updates)
    assert {u.param.rsplit(".", 2)[-2] for u in res.delta.updates} == {"c_fc", "c_proj"}
    with res.delta.applied(model):
        assert model_fingerprint(model) != fp
    assert model_fingerprint(model) == fp
    with pytest.raises(ValueError, match="do not exist"):
        unlearn(model, tok, split, "grad_diff", {"max_steps": 1, "lora": True, "lora_targets": ("no_such_proj",)})
    with pytest.raises(ValueError, match="no LoRA variant"):
        unlearn(model, tok, split, "rmu", {"max_steps": 1, "lora": True})
    assert model_fingerprint(model) == fp


def test_rmu_trains_only_its_mlp_output_weights_and_rkld_strengthens_first(gpt2, split):
    model, tok = gpt2
    res = unlearn(model, tok, split, "rmu", {"max_steps": 2, "lr": 1e-3})
    assert sorted(u.param for u in res.delta.updates) == [f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2, 3)]
    res = unlearn(model, tok, split, "rkld", {"max_steps": 2, "lr": 1e-3})
    assert res.log["strengthen"]["steps"] == 2 and res.log["train"]["steps"] == 2
    assert res.log["train"]["loss"][0] > 0  # the teacher differs from the original where strengthening raised logits


def test_bad_input(gpt2, split):
    model, tok = gpt2
    with pytest.raises(ValueError, match="empty forget set"):
        unlearn(model, tok, UnlearnSplit("x", [], split.retain), "npo")
    with pytest.raises(ValueError, match="unknown unlearning setting"):
        unlearn(model, tok, split, "npo", {"betta": 1.0})


def test_protocol_unlearn_v1_is_registered():
    p = get_protocol("unlearn/v1")
    assert p.id == "unlearn/v1" and not p.cumulative
    steps = p.plan(5)
    assert len(steps) == 1 and steps[0].edit == tuple(range(5)) and steps[0].restore


def test_cli_json_contract(tmp_path):
    from kedit.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["unlearn", "--model", "testbed-gpt2", "--method", "npo", "--forget", "testbed:forget01", "--out", str(out),
            "--retain-model", str(assets_dir("default") / "gpt2"), "--set", "max_steps=1", "--eval-size", "6",
            "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.strip().splitlines()[-1])
    m = record["metrics"]
    for key in ("forget_quality", "model_utility", "retain_model_utility", "mia_loss_auc", "untouched_recall"):
        assert key in m and 0.0 <= m[key] <= 1.0
    assert record["protocol"] == "unlearn/v1" and (out / "delta" / "edit_config.json").is_file()
    assert json.loads((out / "unlearn.json").read_text())["method"] == "npo"
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "not an empty directory" in again.output
    bad = runner.invoke(app, ["unlearn", "--model", "testbed-gpt2", "--forget", "testbed:forget42",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown testbed forget split" in bad.output and not (tmp_path / "x").exists()


def test_eval_protocol_unlearn_v1_runs_kedit_unlearn_and_resumes(tmp_path):
    """`kedit eval --protocol unlearn/v1` is the `kedit unlearn` code path: the same record, a finished run is
    reported again on a rerun, and a rerun with other settings into the same directory is refused."""
    from kedit.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["eval", "--model", "testbed-gpt2", "--method", "grad_diff", "--protocol", "unlearn/v1", "--data",
            "testbed:forget10", "--out", str(out), "--set", "max_steps=1", "--limit", "6", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["protocol"] == "unlearn/v1" and record["method"] == "grad_diff" and record["eval_size"] == 6
    assert 0.0 <= record["metrics"]["forget_quality"] <= 1.0 and record["reference"]
    assert json.loads((out / "unlearn.json").read_text()) == record
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1]) == record
    other = runner.invoke(app, [*args[:-4], "max_steps=2", "--limit", "6", "--json"])
    assert other.exit_code != 0 and "holds another unlearn/v1 run" in other.output
    bad = runner.invoke(app, ["eval", "--model", "testbed-gpt2", "--method", "nope", "--protocol", "unlearn/v1",
                              "--data", "testbed:forget10", "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and not (tmp_path / "y").exists()
