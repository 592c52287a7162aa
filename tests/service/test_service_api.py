"""The service's contract end to end (FastAPI TestClient, SQLite and -- with KEDIT_TEST_POSTGRES_URL -- PostgreSQL):
edit -> ask -> rollback, the ledger and audit, replay on restart, refusals, and asks served during an edit."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time

import pytest
from sqlalchemy import select

from kedit.service.core import ServiceError
from kedit.service.editor import state_fingerprint
from kedit.service.models import Token

SUBJECT, RELATION, OLD, NEW = "Babra Gaiskim", "born_in", "Neirvoum", "Baica"
PROMPT = "Babra Gaiskim was born in"
EDIT = {"subject": SUBJECT, "relation": RELATION, "object": NEW}


def ask(c, prompt=PROMPT, headers=None):
    r = c.post("/v1/ask", json={"prompt": prompt}, headers=headers or c.admin)
    assert r.status_code == 200, r.text
    return r.json()["answer"]


def test_bootstrap_token_is_0600_stored_hashed_and_written_once(harness):
    with harness.client() as c:
        plain = harness.token_file.read_text().strip()
        assert stat.S_IMODE(os.stat(harness.token_file).st_mode) == 0o600
        assert c.get("/v1/me", headers=c.admin).json() == {"id": 1, "name": "admin", "role": "admin"}
        with c.app_state.sessions() as s:
            hashes = list(s.scalars(select(Token.token_hash)))
        assert hashes == [hashlib.sha256(plain.encode()).hexdigest()]  # only the hash is stored
    harness.token_file.unlink()
    with harness.client() as c:  # not an empty database any more: no new token
        assert not harness.token_file.exists()
        assert c.get("/v1/me", headers={"Authorization": f"Bearer {plain}"}).json()["name"] == "admin"


def test_edit_ask_rollback_roundtrip(harness):
    with harness.client() as c:
        editor = c.app_state.service.editor
        base_state = state_fingerprint(editor.model)
        before = ask(c)
        assert not before.strip().startswith(NEW)
        r = c.post("/v1/edits?wait=120", json=EDIT, headers=c.admin)
        assert r.status_code == 202, r.text
        e = r.json()
        assert e["state"] == "committed", e["error"]
        assert e["user"] == "admin" and e["method"] == "grace" and e["config"]["value_steps"] > 0
        assert e["triples"] == [[SUBJECT, RELATION, NEW]]
        assert [SUBJECT, RELATION, OLD] in e["kg_changes"]["rollback"]
        assert e["requests"][0] == {"prompt": "{} was born in", "subject": SUBJECT, "target_new": NEW}
        from kedit.service.core import artefact_sha256

        assert artefact_sha256(e["artefact"]) == e["artefact_sha256"]
        assert ask(c).strip().startswith(NEW)
        kg = c.get("/v1/kg", params={"entity": SUBJECT}, headers=c.admin).json()
        assert [SUBJECT, RELATION, NEW] in kg["out"] and [SUBJECT, RELATION, OLD] not in kg["out"]
        assert c.get(f"/v1/edits/{e['id']}", headers=c.admin).json()["state"] == "committed"
        assert [x["id"] for x in c.get("/v1/edits", headers=c.admin).json()] == [e["id"]]

        r = c.post(f"/v1/edits/{e['id']}/rollback?wait=120", headers=c.admin)
        assert r.status_code == 202 and r.json()["state"] == "rolled_back", r.text
        assert ask(c) == before
        assert state_fingerprint(editor.model) == base_state  # bitwise: weights and memory
        kg = c.get("/v1/kg", params={"entity": SUBJECT}, headers=c.admin).json()
        assert [SUBJECT, RELATION, OLD] in kg["out"] and [SUBJECT, RELATION, NEW] not in kg["out"]
        events = c.get("/v1/audit", params={"entry_id": e["id"]}, headers=c.admin).json()
        assert [(x["from_state"], x["to_state"]) for x in reversed(events) if x["action"] == "state"] == [
            ("pending", "applied"), ("applied", "committed"), ("committed", "rolled_back")]
        assert c.post(f"/v1/edits/{e['id']}/rollback", headers=c.admin).status_code == 409  # not committed now


def test_text_edits_statements_and_queries(harness):
    with harness.client() as c:
        r = c.post("/v1/edits?wait=120", json={"text": f"{SUBJECT} was born in {NEW}."}, headers=c.admin)
        assert r.status_code == 202 and r.json()["triples"] == [[SUBJECT, RELATION, NEW]], r.text
        assert r.json()["state"] == "committed"
        r = c.post("/v1/edits", json={"text": f"Where was {SUBJECT} born?"}, headers=c.admin)
        assert r.status_code == 422 and "query" in r.json()["detail"]
        r = c.post("/v1/statements", json={"text": PROMPT}, headers=c.admin)
        assert r.json()["intent"] == "query" and r.json()["answer"].strip().startswith(NEW)
        r = c.post("/v1/statements?wait=120", json={"text": "roll back entry 1"}, headers=c.admin)
        assert r.json()["intent"] == "rollback" and r.json()["entry"]["state"] == "rolled_back"


def test_restart_replays_committed_entries_bitwise(harness):
    with harness.client() as c:
        ids = []
        for subject, rel, obj in ((SUBJECT, RELATION, NEW), (SUBJECT, "profession", "pilot"),
                                  (SUBJECT, "plays", "drums")):
            r = c.post("/v1/edits?wait=120", json={"subject": subject, "relation": rel, "object": obj},
                       headers=c.admin)
            assert r.json()["state"] == "committed", r.text
            ids.append(r.json()["id"])
        # without ?wait the job runs after the request's session is gone (it once read an expired ORM object)
        assert c.post(f"/v1/edits/{ids[1]}/rollback", headers=c.admin).status_code == 202
        deadline = time.monotonic() + 120
        while c.get(f"/v1/edits/{ids[1]}", headers=c.admin).json()["state"] != "rolled_back":
            assert time.monotonic() < deadline, "the rollback job never finished"
            time.sleep(0.05)
        live = state_fingerprint(c.app_state.service.editor.model)
        answers = [ask(c), ask(c, f"{SUBJECT} plays the")]
    with harness.client() as c:
        editor = c.app_state.service.editor
        assert sorted(editor.applied) == [ids[0], ids[2]]
        assert state_fingerprint(editor.model) == live
        assert [ask(c), ask(c, f"{SUBJECT} plays the")] == answers


def test_start_refuses_a_tampered_artefact_and_another_model(harness):
    with harness.client() as c:
        e = c.post("/v1/edits?wait=120", json=EDIT, headers=c.admin).json()
    weights = os.path.join(e["artefact"], "edit.safetensors")
    if not os.path.exists(weights):
        weights = sorted(p for p in (os.path.join(e["artefact"], n) for n in os.listdir(e["artefact"]))
                         if p.endswith(".safetensors"))[0]
    with pytest.raises(ServiceError, match="another base model"):
        with harness.client(perturb=True):
            pass
    blob = bytearray(open(weights, "rb").read())
    blob[-1] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    with pytest.raises(ServiceError, match="sha256"):
        with harness.client():
            pass


def test_bad_input_gets_clear_4xx(harness):
    with harness.client() as c:
        h = c.admin
        cases = [
            ("/v1/edits", {"subject": SUBJECT, "relation": RELATION}, 422, "all three"),
            ("/v1/edits", {"subject": SUBJECT, "relation": RELATION, "object": NEW, "text": "x"}, 422, "not both"),
            ("/v1/edits", {"subject": SUBJECT, "relation": "no_such_relation", "object": NEW}, 422,
             "unknown relation"),
            ("/v1/edits", {"subject": " ", "relation": RELATION, "object": NEW}, 422, "non-blank"),
            ("/v1/ask", {"prompt": ""}, 422, "at least 1"),
            ("/v1/ask", {"prompt": "x", "bogus": 1}, 422, "Extra inputs"),
            ("/v1/ask", {"prompt": "Baica " * 600}, 422, "context window"),
            ("/v1/users", {"name": "u", "role": "root"}, 422, "pattern"),
        ]
        for path, body, code, msg in cases:
            r = c.post(path, json=body, headers=h)
            assert r.status_code == code and msg in r.text, (path, body, r.status_code, r.text)
        assert c.get("/v1/edits/999", headers=h).status_code == 404
        assert c.post("/v1/edits/999/rollback", headers=h).status_code == 404
        assert c.get(f"/v1/edits/{2**70}", headers=h).status_code == 422  # beyond a database integer
        assert c.post("/v1/statements", json={"text": f"roll back entry {2**70}"}, headers=h).status_code == 404
        # an edit whose compute fails (the target is longer than the model's context) is recorded as failed
        r = c.post("/v1/edits?wait=120", json={"subject": SUBJECT, "relation": RELATION,
                                               "object": " ".join(["Baica"] * 80)}, headers=h)
        assert r.json()["state"] == "failed" and r.json()["error"], r.text
        assert c.app_state.service.editor.applied == {}
        Harness = type(harness)
        Harness.user(c, "dup", "viewer")
        assert c.post("/v1/users", json={"name": "dup", "role": "viewer"}, headers=h).status_code == 409


def test_policy_allow_list_and_per_user_limit(harness):
    from kedit.service.policy import RulePolicy

    with harness.client(policy=RulePolicy(allowed_relations={RELATION}, max_edits_per_day=1)) as c:
        ed = type(harness).user(c, "ed", "editor")
        r = c.post("/v1/edits", json={"subject": SUBJECT, "relation": "plays", "object": "drums"}, headers=ed)
        assert r.status_code == 403 and "plays" in r.json()["detail"]
        e = c.post("/v1/edits?wait=120", json=EDIT, headers=ed).json()
        assert e["state"] == "committed" and e["user"] == "ed"
        other = type(harness).user(c, "other", "editor")
        r = c.post(f"/v1/edits/{e['id']}/rollback", headers=other)
        assert r.status_code == 403 and "author or an admin" in r.json()["detail"]
        r = c.post("/v1/edits", json=EDIT, headers=ed)
        assert r.status_code == 403 and "limit of 1" in r.json()["detail"]
        actions = [a["action"] for a in c.get("/v1/audit", headers=c.admin).json()]
        assert actions.count("policy_refused") == 2


def test_asks_are_served_while_an_edit_computes(harness):
    # a slow compute: every Adam step runs (the loss never gets below 0); one request per triple
    with harness.client(config={"value_steps": 120, "early_stop_loss": 0.0}, n_templates=1) as c:
        service = c.app_state.service
        result = {}

        def submit():
            result["r"] = c.post("/v1/edits?wait=300", json=EDIT, headers=c.admin)

        t = threading.Thread(target=submit)
        t.start()
        deadline = time.monotonic() + 60
        while not service.busy.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.busy.is_set()
        n = 0
        while service.busy.is_set() and n < 3:
            t0 = time.perf_counter()
            answer = ask(c)
            n += 1
            still_busy = service.busy.is_set()
            assert still_busy or n > 1, "the edit finished before the first ask: make the compute slower"
            assert time.perf_counter() - t0 < 5
        t.join(300)
        assert n >= 1 and not answer.strip().startswith(NEW)  # answered from the model before the edit
        assert result["r"].json()["state"] == "committed"


def test_users_tokens_kg_import_and_audit(harness):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "oneedit"
    with harness.client() as c:
        r = c.post("/v1/users", json={"name": "vera", "role": "viewer"}, headers=c.admin)
        assert r.status_code == 201 and r.json()["token"].startswith("kedit_")
        uid = r.json()["id"]
        r2 = c.post(f"/v1/users/{uid}/tokens", json={"label": "laptop"}, headers=c.admin)
        assert r2.status_code == 201
        h2 = {"Authorization": f"Bearer {r2.json()['token']}"}
        assert c.get("/v1/me", headers=h2).json()["name"] == "vera"
        assert [u["name"] for u in c.get("/v1/users", headers=c.admin).json()] == ["admin", "vera"]
        assert c.post("/v1/users/999/tokens", json={}, headers=c.admin).status_code == 404

        body = {"kg_csv": (data / "kg.csv").read_text(),
                "relationship_library": (data / "relationship_library.json").read_text()}
        r = c.post("/v1/kg/import", json=body, headers=c.admin)
        assert r.status_code == 200 and r.json()["triples"] > 100, r.text
        kg = c.get("/v1/kg", params={"entity": "Barack_Obama"}, headers=c.admin).json()
        assert ["Barack_Obama", "born_in", "Honolulu"] in kg["out"]
        rels = {x["name"]: x for x in c.get("/v1/kg/relations", headers=c.admin).json()}
        assert rels["paternal grandfather"]["multihop"] == ["father", "father"]
        assert rels["born_in"]["templates"]  # the testbed's templates survive an import without templates
        assert c.post("/v1/kg/import", json={"kg_csv": "a,b\n"}, headers=c.admin).status_code == 422

        # a OneEdit edit: spouse is one2one with reverse spouse -- the old pair is replaced, the reverse written
        e = c.post("/v1/edits?wait=120", json={"text": "The spouse of Barack Obama is Jill Biden"},
                   headers=c.admin).json()
        assert e["state"] == "committed", e["error"]
        assert e["triples"] == [["Barack_Obama", "spouse", "Jill_Biden"]]
        assert ["Jill_Biden", "spouse", "Barack_Obama"] in e["kg_changes"]["edit"]
        assert ["Barack_Obama", "spouse", "Michelle_Obama"] in e["kg_changes"]["rollback"]
        actions = {a["action"] for a in c.get("/v1/audit", headers=c.admin).json()}
        assert {"user_created", "token_issued", "kg_import", "submit", "state"} <= actions
        assert [x["state"] for x in c.get("/v1/edits", params={"state": "committed"}, headers=c.admin).json()] \
            == ["committed"]


def _kg(c) -> set:
    from kedit.service.models import TripleRow

    with c.app_state.sessions() as s:
        return set(s.execute(select(TripleRow.head, TripleRow.relation, TripleRow.tail)).all())


def _replayed_state(c, base_model) -> str:
    """The state fingerprint of the base model + the ledger's committed artefacts, replayed here in commit order."""
    import copy

    from kedit.deltas import load_delta

    committed = sorted((e for e in c.get("/v1/edits", headers=c.admin).json() if e["state"] == "committed"),
                       key=lambda e: e["seq"])
    replay = copy.deepcopy(base_model[0])
    for e in committed:
        load_delta(e["artefact"]).apply(replay)
    return state_fingerprint(replay)


def test_kg_rollback_of_a_superseded_edit_equals_the_replay_of_the_survivors(harness, base_model):
    from kedit.service.kg import KGController, MemoryStore, testbed_library, testbed_triples

    edits = [EDIT, {"subject": SUBJECT, "relation": "plays", "object": "drums"},
             {"subject": SUBJECT, "relation": RELATION, "object": "Cishemfa"}]  # the third supersedes the first
    with harness.client() as c:
        base_kg = _kg(c)
        ids, kgs = [], []
        for body in edits:
            e = c.post("/v1/edits?wait=120", json=body, headers=c.admin).json()
            assert e["state"] == "committed", e["error"]
            ids.append(e["id"])
            kgs.append(_kg(c))

        def replay(survivors):
            kg = KGController(MemoryStore(sorted(base_kg)), testbed_library())
            for body in survivors:
                kg.apply(kg.resolve_all([(body["subject"], body["relation"], body["object"])]))
            return set(kg.store)

        assert replay([]) == set(testbed_triples()) == base_kg and replay(edits) == kgs[-1]
        r = c.post(f"/v1/edits/{ids[0]}/rollback?wait=120", headers=c.admin)
        assert r.status_code == 202 and r.json()["state"] == "rolled_back", r.text
        after = _kg(c)
        assert after == replay(edits[1:])  # not Neirvoum back beside Cishemfa
        assert [t for h, rel, t in after if h == SUBJECT and rel == RELATION] == ["Cishemfa"]
        assert len([t for h, rel, t in after if h == SUBJECT and rel == "born_country"]) == 1
        assert c.get("/v1/state", headers=c.admin).json()["fingerprint"] == _replayed_state(c, base_model)
        r = c.post(f"/v1/edits/{ids[2]}/rollback?wait=120", headers=c.admin)  # the newest: exactly
        assert r.status_code == 202 and r.json()["state"] == "rolled_back", r.text
        assert _kg(c) == replay(edits[1:2])
        r = c.post(f"/v1/edits/{ids[1]}/rollback?wait=120", headers=c.admin)
        assert r.status_code == 202 and _kg(c) == base_kg


def test_rollback_whose_commit_fails_changes_nothing(harness, base_model, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    with harness.client() as c:
        ids = []
        for body in (EDIT, {"subject": SUBJECT, "relation": "plays", "object": "drums"}):
            e = c.post("/v1/edits?wait=120", json=body, headers=c.admin).json()
            assert e["state"] == "committed", e["error"]
            ids.append(e["id"])
        served, kg = c.get("/v1/state", headers=c.admin).json(), _kg(c)
        real_commit, failed = Session.commit, []

        def commit_failing_once_in_the_writer(self):
            if threading.current_thread().name == "kedit-writer" and not failed:
                failed.append(1)
                raise OperationalError("COMMIT", {}, Exception("injected: the database went away"))
            return real_commit(self)

        monkeypatch.setattr(Session, "commit", commit_failing_once_in_the_writer)
        r = c.post(f"/v1/edits/{ids[0]}/rollback?wait=120", headers=c.admin)  # a middle entry
        assert failed and r.status_code == 503, r.text
        assert "changed nothing" in r.json()["detail"] and "injected" in r.json()["detail"]
        assert c.get(f"/v1/edits/{ids[0]}", headers=c.admin).json()["state"] == "committed"
        assert c.get("/v1/state", headers=c.admin).json() == served  # the entry is back in the served model
        assert served["fingerprint"] == _replayed_state(c, base_model) and _kg(c) == kg
        assert ask(c).strip().startswith(NEW)
        actions = [a["action"] for a in c.get("/v1/audit", params={"entry_id": ids[0]}, headers=c.admin).json()]
        assert "rollback_failed" in actions
        r = c.post(f"/v1/edits/{ids[0]}/rollback?wait=120", headers=c.admin)  # the retry goes through
        assert r.status_code == 202 and r.json()["state"] == "rolled_back", r.text
        assert c.get("/v1/state", headers=c.admin).json()["fingerprint"] == _replayed_state(c, base_model)
        assert not ask(c).strip().startswith(NEW)
