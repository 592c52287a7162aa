"""The lifelong protocol ``lifelong/v1``: a long stream of edits, evaluated at checkpoints.

The setting of GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023) and WISE (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing
of Large Language Models", NeurIPS 2024): edits arrive one chunk at a time and stay live; what matters is how the
model holds up as they accumulate. Definitions (``docs/eval.md`` has the full text):

* **Stream** (:func:`make_stream`): T = the last checkpoint. ``round(reedit_rate · T)`` positions, drawn with the
  seed, are **re-edits**: the same fact (subject and relation, or subject and prompt where the data names no
  relation) edited again, at least k positions after its previous edit (so never in the same compute call), to a
  new target different from its true object and from every earlier target of it. A fact is re-edited at most
  once. The other positions are the first records given, in order (one record per fact: testbed requests are).
  A re-edit request is its fact's request with the new ``target_new``, no target aliases and no portability probes
  (the two-hop answers followed the earlier target).
* **Chunks** of k consecutive stream edits, one ``compute`` call each, on the model with every earlier edit live;
  the stream is cut at every checkpoint first, so a checkpoint falls between two calls.
* **Retention** at checkpoint t: every fact edited in the first t positions is evaluated once, by its *newest*
  request (the earlier target of a re-edited fact counts only through the newest one), with today's strict
  definitions (every registered metric; neighbourhood probes naming a subject edited so far excluded, locality
  rule 2). ``reliability`` / ``generalization`` are therefore over all edits so far, not the newest chunk.
* **Locality** (:func:`choose_probes`): a fixed set of at most ``locality_probes`` facts whose prompt names no
  subject (nor alias) edited anywhere in the whole stream, chosen with the seed before the first edit; the same
  probes at every checkpoint. ``locality/untouched_unchanged``: the greedy continuation equals the pre-edit one
  (whitespace-collapsed, the length rule of exact match); ``locality/untouched_recall``: exact match of the
  continuation against the probe's true object (its pre-edit value is ``pre_mean``). The summary aspect
  ``locality`` is ``locality/untouched_unchanged`` here.
* **Re-edits**: ``reedit/newest_wins`` = share of the facts re-edited so far whose greedy answer to the edit prompt
  is the newest target (exact match, as reliability); ``reedit/stale`` = share still answering an earlier target;
  the summary aspect ``reedit`` is ``reedit/newest_wins``.
* **Cost**: ``cost/seconds_per_edit`` = wall time of compute + apply of the first t edits / t (the first call
  includes any covariance statistics it computes); ``cost/memory_bytes`` = bytes held for the edits at the
  checkpoint: the rollback ledger's base copies (:func:`kedit.deltas.rollback_bytes`) plus, for memory methods,
  the side memory's records and look-up tensors (:func:`memory_bytes`).
* Perplexity (``capability/perplexity``) on the given texts (held-out testbed filler on the command line).

Files in ``out_dir``: ``manifest.json`` (as other protocols, plus the stream's and the probes' hashes),
``records.jsonl`` (one row per evaluated fact per checkpoint, with ``checkpoint``), ``checkpoints.jsonl`` (one row
per completed checkpoint: its metrics), ``summary.json``. **Resuming**: completed checkpoints are kept (the rows of
a checkpoint killed half-way are dropped); the edits are *replayed* (recomputed with the same seed, as the other
cumulative protocols do, which also rebuilds cross-call method state) up to the first missing checkpoint, and the
run goes on from there. Time per edit of a resumed checkpoint counts the replayed edits' time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kedit.data.select import mentions_any, subject_conflicts, subject_key
from kedit.eval.metrics import exact_match, metric_definitions, record_metrics
from kedit.eval.protocols import check_checkpoints, get_protocol
from kedit.requests import EditRequest, Probe

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "LIFELONG_DEFINITIONS",
    "choose_probes",
    "default_checkpoints",
    "fact_key",
    "load_lifelong",
    "make_stream",
    "memory_bytes",
    "neighbourhood_facts",
    "run_lifelong",
    "testbed_locality_facts",
    "testbed_reedit_targets",
]

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = (10, 100, 300, 1000)

LIFELONG_DEFINITIONS: dict[str, str] = {
    "locality/untouched_unchanged": "per probe of the fixed set of untouched facts (prompts naming no subject or "
    "alias edited anywhere in the stream, chosen with the seed before the first edit, the same at every "
    "checkpoint), 1 if the greedy continuation (max(max_new_tokens, answer tokens + 2) tokens, whitespace-"
    "collapsed) is identical to the pre-edit one, else 0; mean over the probes.",
    "locality/untouched_recall": "per probe of the fixed set of untouched facts, exact match of the greedy "
    "continuation against the fact's true object (the exact-match rule of reliability); mean over the probes. "
    "pre_mean: the same on the unedited model.",
    "reedit/newest_wins": "over the facts edited at least twice in the stream so far: 1 if the greedy continuation "
    "of the edit prompt exactly matches the NEWEST target (the exact-match rule of reliability), else 0; mean over "
    "those facts.",
    "reedit/stale": "over the facts edited at least twice so far: 1 if the greedy continuation of the edit prompt "
    "exactly matches one of the fact's EARLIER targets, else 0; mean over those facts.",
    "cost/seconds_per_edit": "wall time of compute + apply of the first t stream edits divided by t (any "
    "statistics the first compute call gathers included); one value.",
    "cost/memory_bytes": "bytes held for the live edits at the checkpoint: the rollback ledger's base copies "
    "(kedit.deltas.rollback_bytes) plus the side memory's records (keys, values) and look-up tensors for memory "
    "methods; one value.",
}


# -- the stream ---------------------------------------------------------------------------------------------------
def fact_key(req: EditRequest) -> str:
    """The fact a request edits: its subject (:func:`subject_key`) and its relation (``extra["relation"]`` or
    ``extra["relation_id"]``), or its prompt where the data names no relation."""
    extra = req.extra or {}
    rel = extra.get("relation") or extra.get("relation_id")
    return subject_key(req.subject) + "\x1f" + (str(rel) if rel else req.prompt)


def _relation(req: EditRequest) -> str:
    extra = req.extra or {}
    return str(extra.get("relation") or extra.get("relation_id") or req.prompt)


def default_checkpoints(n: int) -> tuple[int, ...]:
    """10, 100, 300, 1000 cut to ``n`` records: the defaults below ``min(n, 1000)``, then ``min(n, 1000)``."""
    last = min(n, DEFAULT_CHECKPOINTS[-1])
    return tuple(c for c in DEFAULT_CHECKPOINTS if c < last) + (last,)


def _reedit_request(req: EditRequest, new: str, earlier: Sequence[str], number: int) -> EditRequest:
    extra = {k: v for k, v in (req.extra or {}).items() if k != "target_aliases"}
    extra.update({"reedit_of": req.case_id, "earlier_targets": list(earlier), "edit_number": number})
    base = str(req.case_id if req.case_id is not None else "").split("/re")[0]
    return dataclasses.replace(req, target_new=new, portability=(), case_id=f"{base}/re{number - 1}", extra=extra)


def make_stream(
    requests: Sequence[EditRequest],
    length: int,
    reedit_rate: float,
    *,
    k: int = 1,
    seed: int = 0,
    targets: Mapping[str, Sequence[str]] | None = None,
) -> list[EditRequest]:
    """The edit stream of ``length`` positions (see the module docstring): the first records of ``requests`` plus
    ``round(reedit_rate · length)`` seeded re-edits, each at least ``k`` positions after its fact's earlier edit.

    ``targets``: ``{relation: candidate objects}`` for the new targets (default: the ``target_new`` and
    ``target_true`` of every record of ``requests`` with that relation). A re-edit slot that no fact can fill yet
    (too early, or no candidate target left) is taken by the next fresh record and the re-edit moves to the next
    position where one can be made. Raises ``ValueError`` when the records cannot fill the stream."""
    if not 0.0 <= reedit_rate < 0.5:
        raise ValueError(f"reedit_rate must be in [0, 0.5), got {reedit_rate}")
    n_re = round(reedit_rate * length)
    if targets is None:
        pool: dict[str, set[str]] = {}
        for r in requests:
            s = pool.setdefault(_relation(r), set())
            s.add(r.target_new)
            if r.target_true:
                s.add(r.target_true)
        targets = {rel: sorted(v) for rel, v in pool.items()}
    rng = random.Random(1_000_003 * (seed + 1) + 7)
    slots = set(rng.sample(range(length), n_re)) if n_re else set()
    fresh = list(requests)
    out: list[EditRequest] = []
    last_pos: dict[str, int] = {}
    history: dict[str, list[EditRequest]] = {}
    reedited: set[str] = set()
    owed = 0
    nxt = 0

    def candidates(key: str) -> list[str]:
        chain = history[key]
        first = chain[0]
        used = {subject_key(x) for x in [first.subject, first.target_true or "", *(r.target_new for r in chain)]}
        return [t for t in targets.get(_relation(first), ()) if subject_key(t) not in used]

    for p in range(length):
        if p in slots:
            owed += 1
        made = False
        if owed > 0 and len(reedited) < n_re:
            eligible = [key for key in history if key not in reedited and p - last_pos[key] >= k and candidates(key)]
            if eligible or nxt >= len(fresh):
                if eligible:
                    key = rng.choice(eligible)
                    chain = history[key]
                    req = _reedit_request(chain[-1], rng.choice(candidates(key)), [r.target_new for r in chain],
                                          len(chain) + 1)
                    chain.append(req)
                    reedited.add(key)
                    last_pos[key] = p
                    out.append(req)
                    owed -= 1
                    made = True
        if not made:
            if nxt >= len(fresh):
                raise ValueError(f"the stream needs {length} edits but the {len(fresh)} records give only {len(out)} "
                                 f"(with {len(reedited)} re-edits)")
            req = fresh[nxt]
            nxt += 1
            key = fact_key(req)
            if key in history:  # the data itself repeats a fact: a re-edit from the data
                reedited.add(key)
                history[key].append(req)
            else:
                history[key] = [req]
            last_pos[key] = p
            out.append(req)
    if len(reedited) < n_re:
        log.warning("lifelong stream: %d re-edits asked for, %d made (no fact could be re-edited in time)", n_re,
                    len(reedited))
    return out


# -- the fixed locality probes ------------------------------------------------------------------------------------
def neighbourhood_facts(requests: Sequence[EditRequest]) -> list[Probe]:
    """Default candidate locality facts: the neighbourhood probes (with an answer) of ``requests``."""
    return [p for r in requests for p in r.neighborhood if p.answer]


def testbed_locality_facts(world: Any) -> list[Probe]:
    """Every fact of a testbed world as a probe: its first trained template, its true object (sorted by relation,
    subject)."""
    from kedit.testbed.world import RELATIONS

    out = []
    for f in world.iter_facts():
        i = world.train_templates[f.relation][f.subject][0]
        out.append(Probe(RELATIONS[f.relation].templates[i].format(f.subject), f.object, f.relation))
    return out


def testbed_reedit_targets(world: Any) -> dict[str, list[str]]:
    """``{relation: every entity of its object type}`` of a testbed world (re-edit target candidates)."""
    from kedit.testbed.world import RELATIONS

    return {rel: sorted(world.entities[RELATIONS[rel].object_type]) for rel in world.facts}


def choose_probes(
    candidates: Sequence[Probe], stream: Sequence[EditRequest], n: int, *, seed: int = 0
) -> tuple[list[Probe], int]:
    """``(probes, pool size)``: at most ``n`` candidates (with an answer, distinct prompts) whose prompt names no
    subject or alias of any request of ``stream``, a seeded sample kept in candidate order."""
    edited = frozenset(subject_key(x) for r in stream for x in (r.subject, *r.aliases))
    seen: set[str] = set()
    pool: list[Probe] = []
    for p in candidates:
        if not p.answer or p.prompt in seen or mentions_any(p.prompt, edited):
            continue
        seen.add(p.prompt)
        pool.append(p)
    if len(pool) <= n:
        return pool, len(pool)
    rng = random.Random(2_000_003 * (seed + 1) + 11)
    keep = sorted(rng.sample(range(len(pool)), n))
    return [pool[i] for i in keep], len(pool)


def _probe_generations(model: nn.Module, tok, probes: Sequence[Probe], scoring: Any) -> list[str]:
    from kedit.core.keys import target_ids
    from kedit.eval.scoring import generate

    need = [max(scoring.max_new_tokens, len(target_ids(tok, p.answer or "")) + 2) for p in probes]
    out = [""] * len(probes)
    for length in sorted(set(need)):
        idx = [i for i, n in enumerate(need) if n == length]
        gens = generate(model, tok, [probes[i].prompt for i in idx], max_new_tokens=length,
                        batch_size=scoring.batch_size)
        for i, g in zip(idx, gens):
            out[i] = g
    return out


def memory_bytes(model: nn.Module) -> int:
    """Bytes of a memory method's side memory on ``model``: every record's key and value plus the derived tensors
    (GRACE: keys, values, radii; WISE: shard task vectors and merged memories); 0 without a memory."""
    from kedit.memory import get_memory

    total = 0
    for book in get_memory(model).values():
        for rec in book.records.values():
            total += rec.key.nbytes + rec.value.nbytes
        derived = [getattr(book, n, None) for n in ("keys", "values", "radii")]  # GRACE's look-up tensors
        derived += [*getattr(book, "tau", {}).values(), *getattr(book, "deltas", {}).values()]  # WISE's
        for t in derived:
            if t is not None:
                total += t.nbytes
    return total


# -- the runner ---------------------------------------------------------------------------------------------------
def _entry(name: str, values: Sequence[float], seed: int, resamples: int, pre: float | None = None,
           with_pre: bool = False) -> dict[str, Any]:
    from kedit.eval.runner import _stat

    e = {**_stat(list(values), seed, resamples), "metric": name, "definition": LIFELONG_DEFINITIONS[name],
         "partial_credit": False}
    if with_pre:
        e["pre_mean"] = pre
    return e


def _one(name: str, value: float) -> dict[str, Any]:
    return {"mean": value, "ci95": None, "n": 1, "metric": name, "definition": LIFELONG_DEFINITIONS[name],
            "partial_credit": False}


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def run_lifelong(
    model: nn.Module,
    tok,
    reqs: Sequence[EditRequest],
    spec: Any,
    mcfg: Any,
    *,
    config: Any,
    out_dir: Any = None,
    ctx: Any = None,
    ppl_texts: Sequence[str] | None = None,
    model_name: str | None = None,
    pre_cache_dir: Any = None,
    progress: Any = None,
    locality_facts: Sequence[Probe] | None = None,
    reedit_targets: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """``lifelong/v1`` for :func:`kedit.eval.runner.run_eval` (which validates and calls it)."""
    from kedit import api
    from kedit.core.context import EditContext
    from kedit.deltas import kedit_version, rollback_bytes
    from kedit.eval.runner import (
        EVAL_FORMAT_VERSION,
        LOCALITY_RULE,
        EvalRun,
        _append_jsonl,
        _evaluate,
        _identity_config,
        _jsonable,
        _open_run_dir,
        _ppl,
        _pre_edit,
        _read_jsonl,
        _sha,
        _write_json,
        summarize,
        too_long_records,
    )
    from kedit.fingerprint import model_fingerprint

    protocol = get_protocol(config.protocol)
    scoring = config.scoring()
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
    t_start = time.perf_counter()
    fingerprint = model_fingerprint(model)

    def report(stage: str, d: int, t: int) -> None:
        if progress is not None:
            progress(stage, d, t)

    skipped = too_long_records(model, tok, reqs, config, mcfg)
    base = [r for i, r in enumerate(reqs) if i not in skipped]
    if not base:
        raise ValueError("no records left to edit (every one is too long for the model's context window)")
    cps = check_checkpoints(config.checkpoints, len(base)) if config.checkpoints else default_checkpoints(len(base))
    T = cps[-1]
    stream = make_stream(base, T, config.reedit_rate, k=config.batch_size, seed=config.seed, targets=reedit_targets)
    cands = list(locality_facts) if locality_facts is not None else neighbourhood_facts(reqs)
    probes, pool_size = choose_probes(cands, stream, config.locality_probes, seed=config.seed)
    if config.locality_probes and not probes:
        log.warning("lifelong: no locality probe names no edited subject; locality is not measured")
    stream_hash = _sha([r.to_dict() for r in stream])
    probes_hash = _sha([[p.prompt, p.answer] for p in probes])
    ppl_hash = _sha(list(ppl_texts)) if ppl_texts else None
    eval_cfg = _jsonable(config)
    n_reedits = sum(1 for r in stream if (r.extra or {}).get("reedit_of") is not None)
    identity = {
        "format_version": EVAL_FORMAT_VERSION,
        "protocol": protocol.describe(),
        "method": spec.name,
        "method_config": _jsonable(mcfg),
        "model": name,
        "model_fingerprint": fingerprint,
        "records_hash": _sha([r.to_dict() for r in reqs]),
        "stream_hash": stream_hash,
        "probes_hash": probes_hash,
        "n": T,
        "eval_config": _identity_config(eval_cfg),
        "ppl_texts_hash": ppl_hash,
        "locality_rule": {"version": LOCALITY_RULE, "rule": "neighbourhood probes that name a subject edited in "
                          "the evaluated model state are excluded (counted per record in locality_excluded)"},
    }
    manifest: dict[str, Any] = {
        **identity,
        "eval_config": eval_cfg,
        "checkpoints": list(cps),
        "stream": {"T": T, "n_reedits": n_reedits, "n_facts": len({fact_key(r) for r in stream}),
                   "n_records_given": len(reqs), "n_skipped": len(skipped),
                   "locality_probes": len(probes), "locality_pool": pool_size},
        "metric_definitions": {**metric_definitions(), **{k: {"name": k, "id": f"{k}@v1", "aspect": k.split("/")[0],
                                                               "definition": v, "partial_credit": False,
                                                               "needs_pre": True, "higher_is_better": not
                                                               k.startswith(("cost/", "reedit/stale")),
                                                               "easyedit": None}
                                                          for k, v in LIFELONG_DEFINITIONS.items()}},
        "kedit_version": kedit_version(),
        "perplexity": "measured" if ppl_texts else "not measured: no general texts given (ppl_texts)",
    }
    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    prior_seconds = 0.0
    if out is not None:
        mpath = out / "manifest.json"
        resuming, prior_seconds = _open_run_dir(out, identity)
        if resuming:
            for row in _read_jsonl(out / "checkpoints.jsonl"):
                if int(row["n_edits"]) in cps:
                    done[int(row["n_edits"])] = row
            rows = _read_jsonl(out / "records.jsonl")
            kept = [r for r in rows if int(r.get("checkpoint", -1)) in done]
            if len(kept) != len(rows):  # rows of a checkpoint killed half-way
                (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            if done:
                log.info("resuming %s: checkpoints %s already done", out, sorted(done))
        manifest["state"] = {"seconds": prior_seconds, "complete": False}
        _write_json(mpath, manifest)

    pre_obs, pre_ppl = _pre_edit(model, tok, stream, scoring, ppl_texts, fingerprint, stream_hash, ppl_hash,
                                 Path(pre_cache_dir) if pre_cache_dir is not None else out, report)
    pre_metrics = [record_metrics(o, None) if o is not None else {} for o in pre_obs]
    pre_probe_gens = _probe_generations(model, tok, probes, scoring) if probes else []
    pre_recall = ([exact_match(g, [p.answer]) for g, p in zip(pre_probe_gens, probes)])

    steps = protocol.plan(T, config.batch_size, cps)
    conflicts = sum(subject_conflicts([stream[i] for i in s.edit]) for s in steps)
    if conflicts:
        log.warning("%d request(s) share a subject with another request of the same edit batch; batched "
                    "locate-then-edit methods cannot satisfy both (use --distinct-per-batch)", conflicts)
    last_needed = max((s.index for s in steps if s.checkpoint is not None and s.checkpoint not in done), default=-1)
    base_ctx = dataclasses.replace(ctx or EditContext(), seed=config.seed, state={})
    seed, resamples = int(config.seed), int(config.bootstrap)
    applied: list[Any] = []
    failed: dict[int, str] = {}
    edit_seconds = 0.0
    t_session = time.perf_counter()
    report("edit", 0, T)

    def checkpoint(step: Any) -> None:
        t = step.checkpoint
        newest: dict[str, int] = {}
        count: dict[str, int] = {}
        for i in range(t):
            key = fact_key(stream[i])
            newest[key] = i
            count[key] = count.get(key, 0) + 1
        idx = list(newest.values())
        order = sorted(range(len(idx)), key=lambda j: idx[j])  # facts in order of their newest edit
        idx = [idx[j] for j in order]
        edited = frozenset(subject_key(stream[i].subject) for i in range(t))
        ppl = _ppl(model, tok, ppl_texts, scoring.batch_size)
        keep_cfg = dataclasses.replace(config, keep_observations=True)
        rows: list[dict[str, Any]] = []
        for b in range(0, len(idx), config.eval_chunk):
            rows += _evaluate(model, tok, stream, idx[b : b + config.eval_chunk], step, t, scoring, pre_obs,
                              pre_metrics, ppl, keep_cfg, failed, edited)
        newest_wins, stale = [], []
        for row in rows:
            req = stream[row["index"]]
            row["checkpoint"] = t
            row["n_fact_edits"] = count[fact_key(req)]
            obs = row.get("observation")
            if row["n_fact_edits"] >= 2 and obs is not None and not row.get("error"):
                gen = obs["groups"]["rewrite"][0]["generation"]
                earlier = [x for x in (req.extra or {}).get("earlier_targets", []) if x != req.target_new]
                if not earlier:  # a re-edit that came with the data: the earlier requests' targets
                    earlier = [stream[i].target_new for i in range(row["index"]) if fact_key(stream[i]) ==
                               fact_key(req) and stream[i].target_new != req.target_new]
                row["reedit"] = {"newest": exact_match(gen, [req.target_new]),
                                 "stale": max((exact_match(gen, [x]) for x in earlier), default=0.0)}
                newest_wins.append(row["reedit"]["newest"])
                stale.append(row["reedit"]["stale"])
            if not config.keep_observations:
                row.pop("observation", None)
        gens = _probe_generations(model, tok, probes, scoring) if probes else []
        unchanged = [float(_same_text(a, b)) for a, b in zip(gens, pre_probe_gens)]
        recall = [exact_match(g, [p.answer]) for g, p in zip(gens, probes)]
        summ = summarize(rows, manifest)
        metrics = summ["metrics"]
        metrics["locality/untouched_unchanged"] = _entry("locality/untouched_unchanged", unchanged, seed, resamples)
        metrics["locality/untouched_recall"] = _entry(
            "locality/untouched_recall", recall, seed, resamples,
            pre=sum(pre_recall) / len(pre_recall) if pre_recall else None, with_pre=True)
        metrics["locality"] = dict(metrics["locality/untouched_unchanged"])
        metrics["reedit/newest_wins"] = _entry("reedit/newest_wins", newest_wins, seed, resamples)
        metrics["reedit/stale"] = _entry("reedit/stale", stale, seed, resamples)
        metrics["reedit"] = dict(metrics["reedit/newest_wins"])
        metrics["cost/seconds_per_edit"] = _one("cost/seconds_per_edit", edit_seconds / t)
        held = {"rollback_bytes": rollback_bytes(model), "memory_bytes": memory_bytes(model)}
        metrics["cost/memory_bytes"] = _one("cost/memory_bytes", float(held["rollback_bytes"] + held["memory_bytes"]))
        cp_row = {"n_edits": t, "step": step.index, "n_facts": len(idx), "n_reedited": len(newest_wins),
                  "n_errors": summ["n_errors"], "locality_probes_excluded": summ["locality_probes_excluded"],
                  "edit_seconds": round(edit_seconds, 4), "held": held, "metrics": metrics}
        if out is not None:
            _append_jsonl(out / "records.jsonl", rows)
            _append_jsonl(out / "checkpoints.jsonl", [cp_row])
            manifest["state"] = {"seconds": prior_seconds + time.perf_counter() - t_session, "complete": False}
            _write_json(out / "manifest.json", manifest)
        done[t] = json.loads(json.dumps(_jsonable(cp_row)))
        done_rows[t] = json.loads(json.dumps(_jsonable(rows)))

    done_rows: dict[int, list[dict[str, Any]]] = {}

    def restore() -> None:
        while applied:
            applied.pop().revert(model)

    try:
        for step in steps:
            if step.index > last_needed:
                break
            to_edit = list(step.edit)
            t0 = time.perf_counter()
            try:
                res = api.edit(model, tok, [stream[i] for i in to_edit], method=spec.name, config=mcfg,
                               ctx=base_ctx, apply=True, evaluate=False)
                applied.append(res)
            except Exception as e:
                names = ", ".join(api.record_label(i, stream[i].case_id) for i in to_edit[:5])
                if config.on_error == "raise":
                    if not hasattr(e, "kedit_records") or len(to_edit) > 1:
                        e.kedit_records = names  # type: ignore[attr-defined]
                    raise
                error = f"{type(e).__name__}: {e}"
                log.warning("step %d (%s) failed: %s", step.index, names, error)
                failed.update({i: error for i in to_edit})
            edit_seconds += time.perf_counter() - t0
            report("edit", to_edit[-1] + 1, T)
            if step.checkpoint is not None and step.checkpoint not in done:
                checkpoint(step)
    finally:
        restore()
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the model was not restored to its pre-run weights; results are not trustworthy")
    seconds = prior_seconds + time.perf_counter() - t_session
    records: list[dict[str, Any]] = []
    if out is not None:
        records = _read_jsonl(out / "records.jsonl")
    else:
        records = [r for t in sorted(done_rows) for r in done_rows[t]]
    summary = _summary(manifest, [done[t] for t in sorted(done)], records, seconds)
    summary["pre_perplexity"] = pre_ppl
    summary["setup_seconds"] = round(t_session - t_start, 3)
    summary["subject_conflicts"] = conflicts
    summary["complete"] = True
    if out is not None:
        manifest["state"] = {"seconds": seconds, "complete": True}
        _write_json(out / "manifest.json", manifest)
        _write_json(out / "summary.json", summary)
    return EvalRun(manifest, records, summary, out, points=[done[t] for t in sorted(done)])


def _summary(manifest: Mapping[str, Any], cps: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
             seconds: float | None) -> dict[str, Any]:
    """The summary of a lifelong run: the last checkpoint's metrics at the top, every checkpoint's in a list."""
    from kedit.eval.runner import EVAL_FORMAT_VERSION

    cfg = manifest["eval_config"]
    last = cps[-1] if cps else None
    last_rows = [r for r in records if last is not None and int(r.get("checkpoint", -1)) == int(last["n_edits"])]
    return {
        "format_version": EVAL_FORMAT_VERSION,
        "protocol": manifest["protocol"]["id"],
        "protocol_info": manifest["protocol"],
        "method": manifest["method"],
        "model": manifest["model"],
        "n": manifest["n"],
        "n_evaluated": len(last_rows),
        "n_errors": 0 if last is None else last["n_errors"],
        "n_skipped": manifest["stream"]["n_skipped"],
        "locality_probes_excluded": 0 if last is None else last["locality_probes_excluded"],
        "errors": [{"index": r["index"], "record": int(r["index"]) + 1, "case_id": r.get("case_id"),
                    "skipped": False, "error": r["error"]} for r in last_rows if r.get("error")][:50],
        "batch_size": cfg.get("batch_size"),
        "headline": cfg["headline"],
        "stream": manifest["stream"],
        "metrics": {} if last is None else dict(last["metrics"]),
        "checkpoints": [{"n_edits": c["n_edits"], "metrics": c["metrics"], "n_facts": c["n_facts"],
                         "n_reedited": c["n_reedited"], "held": c["held"]} for c in cps],
        "seconds": None if seconds is None else round(seconds, 3),
        "kedit_version": manifest.get("kedit_version"),
    }


def load_lifelong(d: Path, manifest: dict[str, Any], records: list[dict[str, Any]], complete: bool) -> Any:
    """A lifelong result directory as an :class:`~kedit.eval.runner.EvalRun` (summary rebuilt from
    ``checkpoints.jsonl`` when the run is incomplete)."""
    from kedit.eval.runner import EvalRun, _read_jsonl

    cps = sorted(_read_jsonl(d / "checkpoints.jsonl"), key=lambda c: int(c["n_edits"]))
    spath = d / "summary.json"
    if spath.is_file() and complete:
        summary = json.loads(spath.read_text(encoding="utf-8"))
    else:
        summary = _summary(manifest, cps, records, (manifest.get("state") or {}).get("seconds"))
    summary["complete"] = complete
    return EvalRun(manifest, records, summary, d, points=cps)
