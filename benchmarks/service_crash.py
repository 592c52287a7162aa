"""Crash safety of the knowledge service (issue #15): ``kill -9`` of a real ``kedit serve`` at a random point while
edits (and a rollback) are submitted, then restart, ``--trials`` times on one database.

    python benchmarks/service_crash.py --trials 50 [--db postgresql://...]

After each restart: every entry a client saw committed before the kill is still committed (or rolled back), no
entry is left ``pending``/``applied`` once the writer is idle, every committed artefact matches its sha256, and the
served model's state fingerprint equals base + the committed entries replayed independently in this process.
Prints one JSON line per trial and a summary; exit status 1 on any failure. Uses the helpers of
``tests/service/test_crash.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--db", default=None, help="database URL (default: SQLite in the temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from test_crash import Server, check_after_restart, crash_trial

    from kedit.testbed import load_testbed_model

    base = load_testbed_model("gpt2")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        server = Server(state, args.db or f"sqlite:///{state}/kedit.db")
        server.start()
        failures = 0
        t0 = time.time()
        for trial in range(1, args.trials + 1):
            seen = crash_trial(server, rng)
            server.start()
            try:
                check_after_restart(server, seen, base)
                ok, why = True, ""
            except AssertionError as e:
                ok, why = False, str(e)[:300]
                failures += 1
            entries = server.entries()
            print(json.dumps({"trial": trial, "ok": ok, "seen_committed": len(seen), "entries": len(entries),
                              "committed": sum(e["state"] == "committed" for e in entries),
                              "failed": sum(e["state"] == "failed" for e in entries),
                              "start_s": round(server.start_s, 1), "why": why}), flush=True)
        server.stop()
        print(json.dumps({"trials": args.trials, "failures": failures, "minutes": round((time.time() - t0) / 60, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
