"""Schemathesis over the service's OpenAPI schema, bounded: a few generated cases per operation against a real
uvicorn server on loopback (SQLite and -- with KEDIT_TEST_POSTGRES_URL -- PostgreSQL), with the admin token. No
case may get a 5xx, and every 4xx says why (a non-empty ``detail``). ``benchmarks/service_fuzz.py`` is the big
run (``st run``, 50 cases per operation)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings

EXAMPLES = 4  # per operation


def test_fuzz_every_operation_no_5xx_and_every_4xx_explained(harness, live_server):
    # GRACE with a few value steps: an edit that passes validation is computed and applied for real, quickly
    with live_server(harness, n_templates=1, config={"value_steps": 5}) as url:
        headers = {"Authorization": "Bearer " + harness.token_file.read_text().strip()}
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        # revoking tokens last: the fuzzer may revoke the admin token it runs with
        ops.sort(key=lambda op: op.method.upper() == "DELETE")
        assert len(ops) >= 17, [f"{op.method} {op.path}" for op in ops]
        bad: list[str] = []
        ok: set[str] = set()  # operations that answered 2xx at least once

        def fuzz(op):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy())
            def run(case):
                r = case.call(base_url=url, headers=headers, timeout=60)
                where = f"{op.method.upper()} {op.path} {case.path_parameters or ''} {case.query or ''}"
                if r.status_code < 300:
                    ok.add(f"{op.method.upper()} {op.path}")
                if r.status_code >= 500:
                    bad.append(f"{where}: {r.status_code} {r.text[:200]}")
                elif r.status_code >= 400:
                    try:
                        detail = r.json().get("detail")
                    except ValueError:
                        detail = None
                    if not detail:
                        bad.append(f"{where}: {r.status_code} without a detail: {r.text[:200]}")

            run()

        for op in ops:
            fuzz(op)
        assert not bad, bad
        assert len(ok) >= 8, sorted(ok)  # the token worked: the fuzzer got past auth and validation
