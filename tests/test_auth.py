"""With MONAI Label's authentication on, the signed-in user is the client: leases, results and
saves are recorded under the token's user name, whatever client_id the request claims.

The realm is a local stand-in for Keycloak's realm endpoint (it serves the public key MONAI Label
fetches); tokens are real RS256 JWTs checked by MONAI Label's own code."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import nibabel as nib
import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server import Server, free_port, until
from team import CONF, IMAGES, studies

pytestmark = pytest.mark.server
ROLES = ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"]


@pytest.fixture(scope="module")
def realm():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "segvol", "public_key": base64.b64encode(public).decode()}).encode()

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", free_port()), Realm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/realms/segvol", key
    httpd.shutdown()


def _token(key, user: str | None, roles=ROLES, **claims) -> dict:
    body = {"realm_access": {"roles": roles}, "exp": int(time.time()) + 600, **claims}
    if user is not None:
        body["preferred_username"] = user
    body = {k: v for k, v in body.items() if v is not None}
    return {"Authorization": "Bearer " + jwt.encode(body, key, algorithm="RS256")}


@pytest.fixture(scope="module")
def signed_in(realm, tmp_path_factory):
    """One server with authentication on, shared by the token and role tests."""
    uri, key = realm
    work = tmp_path_factory.mktemp("auth")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": uri}
    folder = studies(work / "studies")
    with Server(folder, CONF, work / "server.log", extra_env=env, headers=_token(key, "ada")) as srv:
        srv.studies = folder
        yield srv, key


@pytest.mark.parametrize(
    ("user", "claims", "why"),
    [
        ("", {}, "preferred_username"),
        (None, {}, "preferred_username"),
        ("   ", {}, "preferred_username"),
        ("a\\b", {}, "preferred_username"),
        ("x" * 300, {}, "preferred_username"),
        (["ada"], {}, "preferred_username"),
        (7, {}, "preferred_username"),
        ("bob\u3000", {}, "preferred_username"),
        ("\u200bbob", {}, "preferred_username"),
        ("ada", {"azp": "another-app"}, "another-app"),
        ("ada", {"exp": None}, "exp"),
        ("ada", {"exp": int(time.time()) - 60}, "expired"),
    ],
)
def test_a_token_without_a_usable_user_acts_as_nobody(signed_in, user, claims, why):
    srv, key = signed_in
    bad = _token(key, user, **claims)
    before = requests.get(f"{srv.url}/segvol/status", headers=_token(key, "ada"), timeout=30).json()
    for method, path, body in [
        ("post", "/activelearning/first", {"client_id": "grace"}),
        ("get", "/segvol/status?client_id=grace", None),
        ("get", "/info/", None),
    ]:
        r = requests.request(method, f"{srv.url}{path}", json=body, headers=bad, timeout=30)
        assert r.status_code == 401 and why in r.json()["detail"], (user, claims, path, r.status_code, r.text)
    after = requests.get(f"{srv.url}/segvol/status", headers=_token(key, "ada"), timeout=30).json()
    assert after["lease"] == before["lease"]


def test_a_large_body_without_a_token_is_refused_before_it_is_read(signed_in):
    srv, _ = signed_in
    r = requests.put(
        f"{srv.url}/datastore/label",
        params={"image": IMAGES[0], "tag": "final"},
        files={"label": ("label.bin", b"\0" * (5 << 20))},
        timeout=60,
    )
    assert r.status_code == 401 and "bearer" in r.json()["detail"], r.text


def test_a_token_signed_by_another_key_is_401(signed_in):
    srv, _ = signed_in
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = requests.post(f"{srv.url}/activelearning/first", json={}, headers=_token(other, "ada"), timeout=30)
    assert r.status_code == 401, r.text


def test_roles_decide_who_changes_the_datastore_and_starts_rounds(signed_in):
    srv, key = signed_in
    annotator = _token(key, "grace", roles=["monailabel-annotator", "monailabel-user"])
    admin = _token(key, "root", roles=["monailabel-admin"])
    nobody = _token(key, "eve", roles=[])
    odd = _token(key, "odd", roles="monailabel-admin")  # a string, not a list: no roles
    ct = nib.Nifti1Image(np.zeros((48, 40, 12), np.int16), np.diag([2.0, 2.0, 5.0, 1.0])).to_bytes()
    checks = [
        ("put", "/datastore/image", {"image": "new1"}, {"file": ("ct.nii", ct)}, "monailabel-admin"),
        ("delete", "/datastore/image", {"id": IMAGES[0]}, None, "monailabel-admin"),
        ("delete", "/datastore/label", {"id": IMAGES[0], "tag": "final"}, None, "monailabel-admin"),
        ("put", "/datastore/label/info", {"label": IMAGES[0], "tag": "final"}, {"info": (None, "{}")}, "admin"),
        ("post", "/train/segvol", {}, None, "monailabel-admin"),
        ("post", "/segvol/pending/retry", {}, None, "monailabel-admin"),
    ]
    for method, path, params, files, role in checks:
        for who in (annotator, nobody, odd):
            r = requests.request(method, f"{srv.url}{path}", params=params, files=files, headers=who, timeout=30)
            assert r.status_code == 403 and role in r.json()["detail"], (path, r.status_code, r.text)
    r = requests.post(f"{srv.url}/activelearning/first", json={}, headers=nobody, timeout=30)
    assert r.status_code == 403, r.text  # no role at all: not even an annotator
    r = requests.post(f"{srv.url}/activelearning/first", json={"client_id": "root"}, headers=annotator, timeout=30)
    assert r.status_code == 200 and r.json()["lease"]["client"] == "grace", r.text
    assert r.json()["strategy"]["first"]["client_id"] == "grace"
    index = lambda: json.loads((srv.studies / "datastore_v2.json").read_text())  # noqa: E731
    stamp = lambda: index()["objects"][r.json()["id"]]["image"]["info"].get("strategy", {})  # noqa: E731
    until(lambda: stamp().get("first", {}).get("client_id") == "grace")  # MONAI Label's record of who asked
    r = requests.put(
        f"{srv.url}/datastore/image", params={"image": "new1"}, files={"file": ("ct.nii", ct)}, headers=admin
    )
    assert r.status_code == 200 and (srv.studies / "new1.nii").exists(), r.text
    r = requests.put(
        f"{srv.url}/datastore/image", params={"image": "../new2"}, files={"file": ("ct.nii", ct)}, headers=admin
    )
    assert r.status_code == 400 and not (srv.studies.parent / "new2.nii").exists(), r.text


def test_the_signed_in_user_is_the_client(realm, tmp_path):
    uri, key = realm
    ada = _token(key, "ada")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": uri}
    with Server(studies(tmp_path / "studies"), CONF, tmp_path / "server.log", extra_env=env, headers=ada) as srv:
        assert requests.get(f"{srv.url}/info/", timeout=10).status_code == 401  # no token, no answer

        r = requests.post(f"{srv.url}/activelearning/first", json={"client_id": "mallory"}, headers=ada, timeout=60)
        assert r.status_code == 200 and r.json()["lease"]["client"] == "ada", r.text
        image = r.json()["id"]
        r = requests.post(
            f"{srv.url}/infer/segvol",
            params={"image": image, "output": "json"},
            files={"params": (None, json.dumps({"label_prompt": [1], "client_id": "mallory"}))},
            headers=ada,
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["client_id"] == "ada", r.text
        label = np.zeros((48, 40, 12), np.uint8)
        label[3:9, 3:9, 2:4] = 1
        r = requests.put(
            f"{srv.url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={
                "params": (None, json.dumps({"client_id": "mallory", "label_info": [{"name": "liver"}]})),
                "label": ("label.bin", label.tobytes(order="F")),
            },
            headers=ada,
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["client"] == "ada", r.text
        status = requests.get(f"{srv.url}/segvol/status", params={"client_id": "mallory"}, headers=ada, timeout=30)
        assert status.json()["client"] == "ada" and status.json()["last_result"]["image"] == image
        assert image in IMAGES


def test_an_autosave_is_handed_only_to_the_signed_in_user_who_made_it(signed_in):
    """With sign-in, autosaved work is the token user's: a client_id naming another user reaches
    nobody else's work, for reading or for dropping."""
    srv, key = signed_in
    image = IMAGES[0]
    shape = nib.load(str(srv.studies / f"{image}.nii.gz")).shape
    work = np.zeros(shape, np.uint8)
    work[1:4, 1:4, 1:3] = 5
    body = {"client_id": "bob", "shape": list(shape), "label_info": [{"value": 5, "name": "liver"}]}
    r = requests.put(
        f"{srv.url}/segvol/autosave",
        params={"image": image},
        files={"params": (None, json.dumps(body)), "label": ("w.bin", work.tobytes(order="F"))},
        headers=_token(key, "ada"),
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["client"] == "ada", r.text  # the token's user, not "bob"
    mine = {"image": image, "client_id": "ada"}
    as_bob = requests.get(f"{srv.url}/segvol/autosave", params=mine, headers=_token(key, "bob"), timeout=30)
    assert as_bob.status_code == 404
    dropped = requests.delete(f"{srv.url}/segvol/autosave", params=mine, headers=_token(key, "bob"), timeout=30)
    assert dropped.json() == {"dropped": False}
    as_ada = requests.get(f"{srv.url}/segvol/autosave", params=mine, headers=_token(key, "ada"), timeout=30)
    assert as_ada.status_code == 200 and as_ada.content == work.tobytes(order="F")
    nobody = requests.get(f"{srv.url}/segvol/autosave", params=mine, timeout=30)
    assert nobody.status_code == 401


def test_the_tokens_roles_decide_who_reviews(signed_in):
    """With sign-in the token's roles make a reviewer (reviewer or admin), never a name: an
    annotator claiming a reviewer's client_id is still refused, and cannot review for anyone."""
    srv, key = signed_in
    image = IMAGES[1]
    shape = nib.load(str(srv.studies / f"{image}.nii.gz")).shape
    label = np.zeros(shape, np.uint8)
    label[1:5, 1:5, 1:3] = 1
    annotator = _token(key, "grace", roles=["monailabel-annotator"])
    reviewer = _token(key, "rita", roles=["monailabel-reviewer"])
    saved = requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={
            "params": (None, json.dumps({"label_info": [{"name": "liver"}]})),
            "label": ("l.bin", label.tobytes(order="F")),
        },
        headers=annotator,
        timeout=60,
    )
    assert saved.status_code == 200, saved.text
    version = saved.json()["version"]
    who = requests.get(f"{srv.url}/segvol/whoami", headers=reviewer, timeout=30).json()
    assert who["client"] == "rita" and who["roles"] == ["annotator", "reviewer"] and not who["admin"]
    body = {"version": version, "action": "approve", "client_id": "rita"}
    refused = requests.post(f"{srv.url}/segvol/review", json=body, headers=annotator, timeout=30)
    assert refused.status_code == 403 and "grace is not a reviewer" in refused.json()["detail"]
    assert requests.get(f"{srv.url}/segvol/team", headers=annotator, timeout=30).status_code == 403
    approved = requests.post(f"{srv.url}/segvol/review", json=body, headers=reviewer, timeout=30)
    assert approved.status_code == 200 and approved.json()["reviewer"] == "rita", approved.text
    admin = _token(key, "root", roles=["monailabel-admin"])
    assert requests.get(f"{srv.url}/segvol/team", headers=admin, timeout=30).status_code == 200
