"""OneEdit's evaluation (Zhang et al., arXiv 2409.07497) of the knowledge service on the testbed world (issue #15).

    python benchmarks/service_oneedit_eval.py [--n 20] [--model testbed-gpt2] [--method grace]

For each sampled record the service (KG = the testbed world, the default editor) gets one edit through
``POST /v1/edits``, is scored, and the edit is rolled back through the API before the next record, as OneEdit
builds a fresh system per record:

* **reliability**: the edited relation's first template with the subject -> the new object;
* **reverse**: for ``capital`` edits, ``capital_of``'s template with the new city -> the country (the KG writes
  the reverse triple);
* **one-hop**: the two-hop relation through the edited one (``born_in -> born_country``, ``works_for ->
  employer_city``, ``citizen_of -> citizen_capital``) -> the composed answer (the KG writes the composition);
* **sub-replace**: the first template with the subject's alias (``Dr. Gaiskim``) -> the new object;
* **paraphrase** (not in OneEdit): the relation's third template, which the editor did not edit (it edits the
  first ``--templates-per-triple`` = 2) -> the new object.

Reliability, reverse and one-hop score the very prompts the KG expansion wrote into the model, so they measure
that the expansion happened and the edit took, not generalisation; paraphrase and sub-replace do.

Scores are OneEdit's token-level ones: greedy generation of exactly as many tokens as the target has, mean
positional match. Also reported: the fraction of rollbacks after which the model's state fingerprint equals the
base model's (bitwise). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ONE_HOP = {"born_in": "born_country", "works_for": "employer_city", "citizen_of": "citizen_capital"}


def token_score(model, tok, prompt: str, target: str) -> float:
    import torch

    from kedit.core.keys import target_ids

    ids = target_ids(tok, target)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=len(ids), min_new_tokens=len(ids), do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    got = out[0, enc["input_ids"].shape[1]:].tolist()
    return sum(int(a == b) for a, b in zip(got, ids)) / len(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="records per kind (born_in, works_for, citizen_of, capital)")
    ap.add_argument("--model", default="testbed-gpt2")
    ap.add_argument("--method", default="grace")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from kedit.service.app import ServiceSettings, create_app
    from kedit.service.editor import state_fingerprint
    from kedit.testbed import load_world
    from kedit.testbed.world import RELATIONS, TWO_HOP

    world = load_world()
    rng = random.Random(args.seed)
    records = []
    for rel in ("born_in", "works_for", "citizen_of", "capital"):
        subjects = sorted(world.facts[rel])
        for s in rng.sample(subjects, min(args.n, len(subjects))):
            objs = [o for o in world.entities[RELATIONS[rel].object_type] if o != world.facts[rel][s]]
            if rel == "capital":  # a city not yet a capital, so the reverse is unambiguous
                objs = [o for o in objs if o not in world.facts["capital_of"]]
            records.append((s, rel, rng.choice(objs)))
    scores: dict[str, list[float]] = {"reliability": [], "reverse": [], "one_hop": [], "sub_replace": [],
                                      "paraphrase": []}
    exact_rollbacks = 0
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServiceSettings(db_url=f"sqlite:///{tmp}/kedit.db", artefacts=f"{tmp}/artefacts",
                                   token_file=f"{tmp}/token", model=args.model, method=args.method)
        with TestClient(create_app(settings)) as c:
            h = {"Authorization": "Bearer " + open(f"{tmp}/token").read().strip()}
            editor = c.app.state.service.editor
            model, tok = editor.model, editor.tok
            base = state_fingerprint(model)
            for s, rel, o in records:
                e = c.post("/v1/edits?wait=600", json={"subject": s, "relation": rel, "object": o}, headers=h).json()
                if e["state"] != "committed":
                    print(f"edit failed: {e['error']}", file=sys.stderr)
                    continue
                with editor.lock:
                    scores["reliability"].append(token_score(model, tok, RELATIONS[rel].templates[0].format(s), o))
                    if rel == "capital":
                        scores["reverse"].append(token_score(model, tok,
                                                             RELATIONS["capital_of"].templates[0].format(o), s))
                    if rel in ONE_HOP:
                        th = TWO_HOP[ONE_HOP[rel]]
                        scores["one_hop"].append(token_score(model, tok, th.templates[0].format(s),
                                                             world.two_hop_answer(th.name, s, first_object=o)))
                    if len(RELATIONS[rel].templates) > 2:
                        scores["paraphrase"].append(token_score(model, tok, RELATIONS[rel].templates[2].format(s), o))
                    for alias in world.aliases.get(s, [])[:1]:
                        scores["sub_replace"].append(token_score(model, tok,
                                                                 RELATIONS[rel].templates[0].format(alias), o))
                r = c.post(f"/v1/edits/{e['id']}/rollback?wait=600", headers=h).json()
                exact_rollbacks += r["state"] == "rolled_back" and state_fingerprint(model) == base
    out = {"model": args.model, "method": args.method, "records": len(records)}
    out.update({k: {"mean": round(sum(v) / len(v), 3), "n": len(v)} for k, v in scores.items() if v})
    out["bitwise_rollbacks"] = f"{exact_rollbacks}/{len(records)}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
