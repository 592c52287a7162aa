"""``kedit serve`` refuses bad options before loading anything (exit status 2, a message naming the option)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kedit.cli import app

runner = CliRunner()


@pytest.fixture
def db_url():  # no database here
    return None


@pytest.mark.parametrize("args, message", [
    (["--kg", "/no/such/dir"], "--kg /no/such/dir"),
    (["--method", "no-such-method"], "no-such-method"),
    (["--set", "no_such_key=1"], "no_such_key"),
    (["--port", "0"], "--port"),
])
def test_serve_refuses_bad_options(tmp_path, args, message):
    r = runner.invoke(app, ["serve", "--dir", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "admin-token").exists()


def test_serve_help_names_the_contract():
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--token-file" in r.output and "--db" in r.output
