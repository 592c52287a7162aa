"""Every route refuses a call without a token (401), with a bad token (401) and from a role below the one it needs
(403). The table below must name every route of the app: a new route without an entry fails the test."""

from __future__ import annotations

from fastapi.routing import APIRoute

PUBLIC = {("GET", "/health"), ("GET", "/")}
NEEDS = {
    ("GET", "/v1/me"): "viewer",
    ("GET", "/v1/state"): "viewer",
    ("POST", "/v1/ask"): "viewer",
    ("POST", "/v1/edits"): "editor",
    ("GET", "/v1/edits"): "viewer",
    ("GET", "/v1/edits/{entry_id}"): "viewer",
    ("POST", "/v1/edits/{entry_id}/rollback"): "editor",
    ("POST", "/v1/statements"): "editor",
    ("GET", "/v1/kg"): "viewer",
    ("GET", "/v1/kg/relations"): "viewer",
    ("POST", "/v1/kg/import"): "admin",
    ("GET", "/v1/users"): "admin",
    ("POST", "/v1/users"): "admin",
    ("POST", "/v1/users/{user_id}/tokens"): "admin",
    ("DELETE", "/v1/tokens/{token_id}"): "admin",
    ("GET", "/v1/audit"): "admin",
}
BELOW = {"viewer": [], "editor": ["viewer"], "admin": ["viewer", "editor"]}


def _routes(app):
    return {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}


def test_every_route_refuses_missing_bad_and_underprivileged_tokens(harness):
    with harness.client() as c:
        routes = _routes(c.app)
        assert routes == PUBLIC | set(NEEDS), f"routes without an auth expectation: {routes - PUBLIC - set(NEEDS)}"
        tokens = {role: type(harness).user(c, f"u-{role}", role) for role in ("viewer", "editor")}
        bad = {"Authorization": "Bearer kedit_not-a-token"}
        for (method, path), needed in sorted(NEEDS.items()):
            url = path.replace("{entry_id}", "1").replace("{user_id}", "1").replace("{token_id}", "1")
            for headers, code in [(None, 401), (bad, 401)] + [(tokens[r], 403) for r in BELOW[needed]]:
                # the body is valid for no route in particular: auth must be checked before the body is used
                r = c.request(method, url, headers=headers, json={"prompt": "x"})
                assert r.status_code == code, (method, path, headers, r.status_code, r.text)
            if needed != "viewer":
                assert f"needs the {needed} role" in c.request(method, url, headers=tokens["viewer"],
                                                              json={}).json()["detail"]
        for method, path in PUBLIC:
            assert c.request(method, path).status_code == 200
        # a revoked token is refused from then on
        r = c.post("/v1/users", json={"name": "gone", "role": "viewer"}, headers=c.admin).json()
        h = {"Authorization": f"Bearer {r['token']}"}
        assert c.get("/v1/me", headers=h).status_code == 200
        assert c.delete(f"/v1/tokens/{r['token_id']}", headers=c.admin).status_code == 200
        assert c.get("/v1/me", headers=h).status_code == 401
