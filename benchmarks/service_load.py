"""Load on the knowledge service (issue #15): ask throughput idle vs while edits run, and a mixed-request storm.

    python benchmarks/service_load.py [--seconds 10] [--clients 16] [--requests 100] [--db URL]

Runs ``kedit serve``'s app (testbed-gpt2, GRACE) in a uvicorn thread on loopback and drives it with ``httpx``:

1. **asks/s idle**: ``--ask-clients`` threads ask for ``--seconds``;
2. **asks/s during edits**: the same while one client submits edits back to back (each waits for its commit);
3. **mixed storm**: ``--clients`` clients × ``--requests`` requests each (ask 50 %, list 20 %, edit 20 %, rollback
   10 % -- of an entry the client last saw committed); afterwards: the number of 5xx answers, that no entry is stuck (``pending``/``applied``) once the writer
   is idle, that every entry's audited state changes form a legal path, and that the served model's fingerprint
   equals base + the committed entries replayed independently here.

Prints one JSON object; exit status 1 on a 5xx or an inconsistency.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _server(tmp: Path, db_url: str, base):
    import uvicorn

    from kedit.service.app import ServiceSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServiceSettings(db_url=db_url, artefacts=str(tmp / "artefacts"), token_file=str(tmp / "token"),
                               n_templates=1)
    app = create_app(settings, model_loader=lambda name: (copy.deepcopy(base[0]), base[1]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    return server, t, f"http://127.0.0.1:{port}", {"Authorization": "Bearer " + (tmp / "token").read_text().strip()}


def _facts(n: int, seed: int):
    from kedit.testbed import load_world

    world = load_world()
    rng = random.Random(seed)
    facts = list(world.iter_facts())
    out = []
    for f in rng.sample(facts, min(n, len(facts))):
        objs = [o for o in world.entities[world.relations[f.relation].object_type] if o != f.object]
        out.append((f.subject, f.relation, rng.choice(objs)))
    return out


def _asks_per_s(url, h, seconds: float, clients: int, prompt: str) -> float:
    import httpx

    count = [0] * clients
    stop = time.monotonic() + seconds

    def run(i):
        with httpx.Client(base_url=url, headers=h, timeout=60) as c:
            while time.monotonic() < stop:
                c.post("/v1/ask", json={"prompt": prompt}).raise_for_status()
                count[i] += 1

    ts = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--ask-clients", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--db", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import httpx

    from kedit.deltas import load_delta
    from kedit.service.editor import state_fingerprint
    from kedit.service.ledger import TRANSITIONS
    from kedit.testbed import load_testbed_model

    base = load_testbed_model("gpt2")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server, thread, url, h = _server(tmp, args.db or f"sqlite:///{tmp}/kedit.db", base)
        prompt = "Babra Gaiskim was born in"
        out["asks_per_s_idle"] = round(_asks_per_s(url, h, args.seconds, args.ask_clients, prompt), 1)

        facts = itertools.cycle(_facts(args.clients * args.requests + 1000, args.seed))
        stop = threading.Event()
        n_edits = [0]

        def editor():
            with httpx.Client(base_url=url, headers=h, timeout=300) as c:
                while not stop.is_set():
                    s, r, o = next(facts)
                    c.post("/v1/edits?wait=300", json={"subject": s, "relation": r, "object": o}).raise_for_status()
                    n_edits[0] += 1

        et = threading.Thread(target=editor)
        et.start()
        time.sleep(0.5)
        out["asks_per_s_during_edits"] = round(_asks_per_s(url, h, args.seconds, args.ask_clients, prompt), 1)
        stop.set()
        et.join()
        out["edits_during_measurement"] = n_edits[0]

        codes: dict[int, int] = {}
        lock = threading.Lock()

        def client(i):
            rng = random.Random(args.seed * 1000 + i)
            known = [1]  # committed entries seen in this client's last listing: what it rolls back
            with httpx.Client(base_url=url, headers=h, timeout=300) as c:
                for _ in range(args.requests):
                    x = rng.random()
                    if x < 0.5:
                        r = c.post("/v1/ask", json={"prompt": prompt})
                    elif x < 0.7:
                        r = c.get("/v1/edits?limit=50")
                        known = [e["id"] for e in r.json() if e["state"] == "committed"] or known
                    elif x < 0.9:
                        with lock:
                            s, rel, o = next(facts)
                        r = c.post("/v1/edits", json={"subject": s, "relation": rel, "object": o})
                    else:
                        r = c.post(f"/v1/edits/{rng.choice(known)}/rollback")
                    with lock:
                        codes[r.status_code] = codes.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["storm_s"] = round(time.perf_counter() - t0, 1)
        out["status_codes"] = {str(k): v for k, v in sorted(codes.items())}
        with httpx.Client(base_url=url, headers=h, timeout=300) as c:
            while True:
                hl = c.get("/health").json()
                entries = c.get("/v1/edits?limit=1000").json()
                if hl["queue"] == 0 and not hl["writer_busy"] and not any(
                        e["state"] in ("pending", "applied") for e in entries):
                    break
                time.sleep(0.2)
            audit = c.get("/v1/audit?limit=5000").json()
            state = c.get("/v1/state").json()
        bad_paths = 0
        for e in entries:
            path = [(a["from_state"], a["to_state"]) for a in reversed(audit)
                    if a["entry_id"] == e["id"] and a["action"] == "state"]
            cur = "pending"
            for a, b in path:
                if a != cur or b not in TRANSITIONS[a]:
                    bad_paths += 1
                    break
                cur = b
            bad_paths += cur != e["state"]
        committed = sorted((e for e in entries if e["state"] == "committed"), key=lambda e: e["seq"])
        replay = copy.deepcopy(base[0])
        for e in committed:
            load_delta(e["artefact"]).apply(replay)
        out["entries"] = {s: sum(e["state"] == s for e in entries) for s in ("committed", "rolled_back", "failed")}
        out["illegal_state_paths"] = bad_paths
        out["fingerprint_matches_replay"] = state["fingerprint"] == state_fingerprint(replay)
        server.should_exit = True
        thread.join(60)
    print(json.dumps(out))
    n5xx = sum(v for k, v in codes.items() if k >= 500)
    return 1 if n5xx or bad_paths or not out["fingerprint_matches_replay"] else 0


if __name__ == "__main__":
    sys.exit(main())
