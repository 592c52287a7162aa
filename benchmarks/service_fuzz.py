"""Fuzz the knowledge service's OpenAPI schema with schemathesis (issue #15): no request may get a 5xx.

    pip install schemathesis
    python benchmarks/service_fuzz.py [--max-examples 50]

Runs the app (testbed-gpt2, GRACE, SQLite in a temporary directory) in a uvicorn thread on loopback and runs
``st run`` against ``/openapi.json`` with the admin token and the ``not_a_server_error`` check (every operation,
``--max-examples`` generated cases each; edits that pass validation really are computed). Prints schemathesis's
summary; the exit status is schemathesis's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        sys.exit("schemathesis is not installed: pip install schemathesis")

    import uvicorn

    from kedit.service.app import ServiceSettings, create_app

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = ServiceSettings(db_url=f"sqlite:///{tmp}/kedit.db", artefacts=str(tmp / "artefacts"),
                                   token_file=str(tmp / "token"), n_templates=1, config={"value_steps": 5})
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        token = (tmp / "token").read_text().strip()
        rc = subprocess.call([st, "run", f"http://127.0.0.1:{port}/openapi.json", "-H", f"Authorization: Bearer {token}",
                              "-c", "not_a_server_error", "-n", str(args.max_examples), "--seed", str(args.seed),
                              "--continue-on-failure"], cwd=tmp)
        server.should_exit = True
        thread.join(60)
    return rc


if __name__ == "__main__":
    sys.exit(main())
