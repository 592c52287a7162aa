"""Trajectories (``unlearn(..., probe=...)``, ``kedit unlearn --trajectory``) and held-out splits: probing at every
epoch leaves training bitwise unchanged, the last epoch's forget quality equals the final evaluation's, the person
halves of a forget set are disjoint and deterministic, and ``privacy10minus05`` is privacy10 without privacy05's
persons."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kedit.testbed import assets_dir
from kedit.unlearn.evaluate import evaluate_model, reference_from, trajectory_probe
from kedit.unlearn.loaders import load_forget_spec
from kedit.unlearn.run import unlearn
from kedit.unlearn.splits import forget_halves
from kedit.unlearn.splits import testbed_scope_split as make_scope_split
from kedit.unlearn.splits import testbed_split as make_split

CFG = {"epochs": 3, "lr": 1e-3, "batch_size": 4}  # forget01: 12 items, 3 steps per epoch


def test_probe_leaves_training_bitwise_unchanged_and_last_epoch_fq_is_the_final_one(gpt2, split):
    model, tok = gpt2
    ref = reference_from(model, tok, split, max_items=12)  # the original as a stand-in retain model
    halves = forget_halves(split)
    inner = trajectory_probe(tok, split, ref, groups=halves, max_items=12)

    def probe(m, where):  # a probe that also draws random numbers and runs in train mode would change training
        torch.rand(7)
        return inner(m, where)

    plain = unlearn(model, tok, split, "grad_diff", CFG)
    probed = unlearn(model, tok, split, "grad_diff", CFG, probe=probe, probe_every_steps=2)
    a, b = plain.delta.updates, probed.delta.updates
    assert len(a) == len(b) > 0
    for u, v in zip(a, b):
        assert u.param == v.param and torch.equal(u.delta, v.delta)
    traj = probed.log["train"]["trajectory"]
    assert [r["at"] for r in traj if r["at"] == "epoch"] == ["epoch"] * 3
    assert [r["step"] for r in traj] == [2, 3, 4, 6, 8, 9]  # every 2 steps, plus the end of each epoch
    assert "trajectory" not in probed.delta.meta["unlearn"]["train"] and "trajectory" not in plain.log["train"]
    first, last = traj[0], traj[-1]
    assert first["forget_quality"] != last["forget_quality"] or first["forget_Q_A_Prob"] != last["forget_Q_A_Prob"]
    with probed.delta.applied(model):
        final = evaluate_model(model, tok, split, ref, untouched=False, max_items=12)
    assert last["forget_quality"] == final["forget_quality"]
    assert last["forget_Q_A_Prob"] == pytest.approx(final["forget_Q_A_Prob"], rel=1e-5)
    assert last["forget_Truth_Ratio"] == pytest.approx(final["forget_Truth_Ratio"], rel=1e-4)
    for g in ("A", "B"):
        assert 0.0 <= last[f"forget_quality_{g}"] <= 1.0
    with pytest.raises(ValueError, match="same max_items"):
        trajectory_probe(tok, split, ref, max_items=6)


def test_forget_halves_are_disjoint_person_halves_and_deterministic():
    sp = make_split("forget10")
    h = forget_halves(sp)
    assert sorted(h["A"] + h["B"]) == list(range(len(sp.forget))) and len(h["A"]) == len(h["B"]) == 72
    pa = {sp.forget[i].subject for i in h["A"]}
    pb = {sp.forget[i].subject for i in h["B"]}
    assert len(pa) == len(pb) == 12 and not pa & pb
    assert forget_halves(sp) == h and forget_halves(sp, seed=1) != h


def test_privacy10minus05_is_disjoint_from_privacy05():
    p05, p10, rest = (make_scope_split(n) for n in ("privacy05", "privacy10", "privacy10minus05"))
    assert set(rest.forget_subjects) == set(p10.forget_subjects) - set(p05.forget_subjects)
    assert len(rest.forget_subjects) == 12 and not set(rest.forget_subjects) & set(p05.forget_subjects)
    assert len(rest.forget) == len(rest.retain) == 36
    assert {q.subject for q in rest.forget} == {q.subject for q in rest.retain} == set(rest.forget_subjects)
    assert set(rest.scopes) == {"unlearn", "retention"}
    assert load_forget_spec("testbed:privacy10minus05").forget == rest.forget


def test_cli_trajectory_records_every_epoch(tmp_path):
    from kedit.cli import app

    out = tmp_path / "run"
    args = ["unlearn", "--model", "testbed-gpt2", "--method", "grad_ascent", "--forget", "testbed:forget01",
            "--out", str(out), "--retain-model", str(assets_dir("default") / "gpt2"), "--set", "epochs=2",
            "--set", "batch_size=6", "--eval-size", "12", "--trajectory", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.strip().splitlines()[-1])
    traj = record["train"]["train"]["trajectory"]
    assert [r["epoch"] for r in traj] == [1.0, 2.0]
    assert traj[-1]["forget_quality"] == record["metrics"]["forget_quality"]
    assert {"forget_quality_A", "forget_quality_B", "forget_truth_ratio_median"} <= set(traj[0])
