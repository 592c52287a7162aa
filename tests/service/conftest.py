"""Fixtures of the service tests: the testbed GPT-2 loaded once per module (each app gets a deep copy, so every
app starts from the pristine base), and a factory of running apps on a temporary SQLite database -- or on the
PostgreSQL server named by ``KEDIT_TEST_POSTGRES_URL`` (one fresh database per app)."""

from __future__ import annotations

import copy
import os
import uuid
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi", reason="the service tests need the service extra: pip install -e '.[service]'")

from fastapi.testclient import TestClient

from kedit.service.app import ServiceSettings, create_app
from kedit.testbed import load_testbed_model

POSTGRES_URL = os.environ.get("KEDIT_TEST_POSTGRES_URL")

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not POSTGRES_URL, reason="KEDIT_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server)")),
]


@pytest.fixture(scope="module")
def base_model():
    return load_testbed_model("gpt2")


def _postgres_database() -> str:
    """A new, empty database on the test server; its URL."""
    from sqlalchemy import create_engine, text

    name = "kedit_test_" + uuid.uuid4().hex[:12]
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/kedit.db"
    return _postgres_database()


class Harness:
    """Starts apps on one database; ``client()`` yields a TestClient with the admin token ready."""

    def __init__(self, base_model, tmp_path, db_url):
        self.base_model = base_model
        self.tmp = tmp_path
        self.db_url = db_url
        self.token_file = tmp_path / "admin-token"

    def settings(self, **kw) -> ServiceSettings:
        kw.setdefault("db_url", self.db_url)
        kw.setdefault("artefacts", str(self.tmp / "artefacts"))
        kw.setdefault("token_file", str(self.token_file))
        return ServiceSettings(**kw)

    def loader(self, perturb: bool = False):
        def load(name):
            model, tok = self.base_model
            m = copy.deepcopy(model)
            if perturb:
                import torch

                with torch.no_grad():
                    next(m.parameters()).view(-1)[0] += 1.0
            return m, tok
        return load

    @contextmanager
    def client(self, perturb: bool = False, **kw):
        app = create_app(self.settings(**kw), model_loader=self.loader(perturb))
        with TestClient(app) as c:
            token = self.token_file.read_text().strip() if self.token_file.exists() else ""
            c.admin = {"Authorization": f"Bearer {token}"}
            c.app_state = app.state
            yield c

    @staticmethod
    def user(c, name: str, role: str) -> dict[str, str]:
        r = c.post("/v1/users", json={"name": name, "role": role}, headers=c.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture
def harness(base_model, tmp_path, db_url):
    return Harness(base_model, tmp_path, db_url)


@pytest.fixture
def live_server():
    """``live_server(harness, **settings)``: see :func:`_live_server`."""
    return _live_server


@contextmanager
def _live_server(harness: Harness, **kw):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(harness.settings(**kw), model_loader=harness.loader())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
