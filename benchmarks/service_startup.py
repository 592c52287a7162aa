"""Start-up time of a real ``kedit serve`` (testbed-gpt2, GRACE, SQLite) with an empty ledger and with ``--edits``
committed entries (issue #15): is the replay of the ledger what makes a start slow?

    python benchmarks/service_startup.py [--edits 150]

Starts the server (the harness of ``tests/service/test_crash.py``), times the start until ``/health`` answers,
commits ``--edits`` edits (the crash harness's five facts over and over), stops it, starts it again (every entry
replayed and verified against the stored fingerprint) and times that start. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=150)
    args = ap.parse_args()

    import httpx
    from test_crash import EDITS, Server

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        server = Server(state, f"sqlite:///{state}/kedit.db")
        server.start()
        out = {"start_s_empty": round(server.start_s, 1)}
        t0 = time.perf_counter()
        with httpx.Client(base_url=server.url, headers=server.h, timeout=300) as c:
            for i in range(args.edits):
                s, r, o = EDITS[i % len(EDITS)]
                c.post("/v1/edits", json={"subject": s, "relation": r, "object": o}).raise_for_status()
        server.idle(3600)
        out["edits_s"] = round(time.perf_counter() - t0, 1)
        server.stop()
        server.start()
        out["committed"] = sum(e["state"] == "committed" for e in server.entries())
        out["start_s_with_ledger"] = round(server.start_s, 1)
        server.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
