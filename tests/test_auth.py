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
import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server import Server, free_port
from test_team import CONF, IMAGES, _studies

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


def _token(key, user: str) -> dict:
    claims = {"preferred_username": user, "realm_access": {"roles": ROLES}, "exp": int(time.time()) + 600}
    return {"Authorization": "Bearer " + jwt.encode(claims, key, algorithm="RS256")}


def test_the_signed_in_user_is_the_client(realm, tmp_path):
    uri, key = realm
    ada = _token(key, "ada")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": uri}
    with Server(_studies(tmp_path / "studies"), CONF, tmp_path / "server.log", extra_env=env, headers=ada) as srv:
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
