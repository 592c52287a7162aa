"""Why WISE's paraphrases fail: router misses vs memory misses, on a short lifelong-like stream.

    python benchmarks/wise_diagnose.py --limit 100 --threads 1                 # testbed-gpt2, testbed:0-1500
    python benchmarks/wise_diagnose.py --limit 100 --select 1000 --threads 1     # the lifelong stream's first 100
    python benchmarks/wise_diagnose.py --limit 100 --set act_ratio=0.6 --json d.json

Edits the first ``--limit`` requests of ``--data`` (``--whole-subjects`` selection, as the lifelong runs) one after
another with WISE (k = 1, every earlier edit live; no re-edits), then, for every edit and every one of its paraphrases,
reads the router's decision at the paraphrase's prefill and the greedy answer (exact match against the target, the
generalization metric's rule, ``max(8, target tokens + 2)`` new tokens). Each miss is classified:

* **router miss**: the paraphrase is not routed to the edit's memory, either because its best score is below that
  memory's threshold ε (*below ε*) or because another memory scores higher (*wrong memory*);
* **memory miss**: routed to the edit's memory and still wrong.

For every router miss the paraphrase is also answered with the routing *forced* to the edit's memory, which says
whether a better router alone would fix it. The edit prompts themselves are reported the same way (reliability),
and the share of 200 prompts of unedited subjects' facts that the router sends to a side memory (false routing).
Only the dev slice is used (never testbed:1500-1550).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        out[k] = json.loads(v)
    return out


def diagnose(model_name: str, data: str, limit: int, overrides: dict, select: int | None = None) -> dict:
    import torch

    import kedit
    from kedit.api import greedy_answers
    from kedit.cli_common import resolve_requests
    from kedit.core.keys import target_ids
    from kedit.eval.metrics import exact_match
    from kedit.memory import get_memory

    model, tok = kedit.load_model(model_name)
    reqs = resolve_requests(data, limit=select or limit, whole=True)[:limit]
    t0 = time.perf_counter()
    for i, req in enumerate(reqs):
        kedit.edit(model, tok, [req], method="wise", config=overrides or None, evaluate=False)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(reqs)} edits, {time.perf_counter() - t0:.0f} s", flush=True)
    edit_s = (time.perf_counter() - t0) / len(reqs)
    mem = next(m for m in get_memory(model).values() if getattr(m, "kind", None) == "wise")
    # the newest edit of each prompt (a subject's facts share its memory)
    memory_of = {mem.records[i].info["prompt"]: mem.memory_of(i) for i in mem.records}

    def answer(prompts: list[str], targets: list[str], force: list[int] | None = None):
        """Greedy answers one prompt at a time (the router's decision of each is read after its prefill)."""
        out = []
        for j, (p, t) in enumerate(zip(prompts, targets)):
            n = max(8, len(target_ids(tok, t)) + 2)
            orig = mem.ratios
            if force is not None:
                fm = force[j]

                def forced(acts, real=None, fm=fm):
                    b = acts.shape[0]
                    return torch.full((b,), float("inf")), torch.full((b,), fm, dtype=torch.long)

                mem.ratios = forced
            try:
                mem._route = None
                gen = greedy_answers(model, tok, [p], max_new_tokens=n)[0]
                # the decision at the prefill (the first forward of the sequence)
                chosen = int(mem.last_memory[0]) if mem.last_memory is not None else -1
                score = float(mem.last_scores[0]) if mem.last_scores is not None else 0.0
            finally:
                mem.ratios = orig
            out.append((exact_match(gen, [t]), chosen, score, gen))
        return out

    rows = []
    for req in reqs:
        want = memory_of[req.text]
        prompts = [req.text] + list(req.paraphrases)
        targets = [req.target_new] * len(prompts)
        res = answer(prompts, targets)
        miss_idx = [j for j, r in enumerate(res) if not r[0] and r[1] != want]
        forced = dict(zip(miss_idx, answer([prompts[j] for j in miss_idx], [targets[j] for j in miss_idx],
                                           force=[want] * len(miss_idx)))) if miss_idx else {}
        for j, (ok, chosen, ratio, gen) in enumerate(res):
            kind = "hit" if ok else ("memory" if chosen == want else ("below_eps" if chosen == -1 else "wrong_memory"))
            rows.append({"case": req.case_id, "subject": req.subject, "prompt": prompts[j], "paraphrase": j > 0,
                         "target": req.target_new, "want": want, "chosen": chosen, "ratio": ratio,
                         "correct": ok, "kind": kind, "generation": gen,
                         "forced_correct": forced[j][0] if j in forced else None})

    # false routing: prompts of facts whose subject is not edited (the lifelong locality pool's kind of input)
    edited = {r.subject for r in reqs}
    pool = [r.text for r in resolve_requests(data) if r.subject not in edited][:200]
    false_routed = 0
    for p in pool:
        mem._route = None
        greedy_answers(model, tok, [p], max_new_tokens=1)
        false_routed += int(mem.last_memory is not None and int(mem.last_memory[0]) >= 0)

    def split(sel):
        n = len(sel)
        c = {k: sum(r["kind"] == k for r in sel) for k in ("hit", "below_eps", "wrong_memory", "memory")}
        routed = sum(r["chosen"] == r["want"] for r in sel)
        fixed = sum(1 for r in sel if r["forced_correct"])
        return {"n": n, **{k: round(v / n, 4) for k, v in c.items()}, "routed_to_own": round(routed / n, 4),
                "router_miss_fixed_by_forcing": fixed, "router_misses": c["below_eps"] + c["wrong_memory"],
                "upper_bound_perfect_router": round((c["hit"] + fixed) / n, 4)}

    return {"model": model_name, "data": data, "limit": limit, "select": select, "config": overrides, "seconds_per_edit":
            round(edit_s, 2), "memories": len(mem.members), "edit_prompts": split([r for r in rows if not r["paraphrase"]]),
            "paraphrases": split([r for r in rows if r["paraphrase"]]),
            "unedited_routed_to_side": round(false_routed / max(1, len(pool)), 4), "unedited_n": len(pool),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed-gpt2")
    ap.add_argument("--data", default="testbed:0-1500")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--select", type=int, default=None,
                    help="take the first --limit edits of the --whole-subjects selection of this many (the lifelong "
                         "runs' stream uses 1000: mostly one fact per subject early on); default: --limit")
    ap.add_argument("--set", action="append", default=[], help="WISEConfig override, key=json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the full result (with every row) here")
    a = ap.parse_args()
    if "1500" in a.data.split(":")[-1].split("-")[0]:
        raise SystemExit("the final-report slice testbed:1500-1550 is not for decisions")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    res = diagnose(a.model, a.data, a.limit, _parse_set(a.set), a.select)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
