"""MONAI Label 0.8.5's ASGI app, as this app needs it.

- Its app loader unloads and re-imports the app's ``lib`` package when it loads the app, so a
  module imported by the routes before would be a stale twin (its ContextVar, its caches): turned
  off (``MONAI_LABEL_RELOAD_APP_LIB``), so every module is imported once, at the top.
- Its token check calls ``jwt.decode`` without ``algorithms``, which the PyJWT 2 it requires
  refuses, so every token was answered 401: ``from_token`` replaces it.
- It answers some client mistakes with HTTP 500: ``as_client_mistake`` makes them 400.
- FastAPI keeps its routers' routes, which cannot be removed: ``answer_first`` puts this app's
  routes for the same paths ahead of them.
"""

from __future__ import annotations

import os

import jwt
import monailabel.endpoints.user.auth as auth
from fastapi import FastAPI, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import User

from lib.compat import MONAI_LABEL, require
from lib.team.identity import usable_name

require("monailabel", MONAI_LABEL, __name__)
os.environ["MONAI_LABEL_RELOAD_APP_LIB"] = "false"  # read when MONAI Label loads the app, after this

# MONAI Label answers these client mistakes with HTTP 500
CLIENT_MISTAKES = ("Neither Image nor File", "DICOM SEG format is not supported in a non-DICOM datastore")


def as_client_mistake(exc: HTTPException) -> HTTPException:
    if exc.status_code == 500 and str(exc.detail).startswith(CLIENT_MISTAKES):
        return HTTPException(status_code=400, detail=f"{exc.detail} (give ?image=<an id from /datastore/>)")
    return exc


def from_token(token: str) -> User:
    """The user a bearer token names, checked against the realm's public key.

    MONAI Label 0.8.5's own check calls ``jwt.decode`` without ``algorithms``, which the PyJWT 2 it
    requires refuses, so every token was answered 401. Same claims and role path
    (``MONAI_LABEL_AUTH_TOKEN_*``), with RS256, the algorithm of Keycloak's realm keys. A token
    must carry an expiry and a usable user name: the user name is the identity everywhere (leases,
    provenance, the SEG's creator), so a token without one, or with an empty or unprintable one,
    is answered 401 naming the claim, never served as anyone."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    try:
        claims = jwt.decode(token, key, algorithms=["RS256"], options={"verify_aud": False, "require": ["exp"]})
    except jwt.InvalidTokenError as e:
        raise HTTPException(status_code=401, detail=f"the token is not valid: {e}") from e
    claim = settings.MONAI_LABEL_AUTH_TOKEN_USERNAME
    username = usable_name(claims.get(claim), strip=False)
    if username is None:
        raise HTTPException(
            status_code=401,
            detail=f"the token's user name claim {claim!r} is missing, empty or not a printable name "
            "(1 to 128 characters, no backslash or '=', no surrounding space): it cannot identify anyone",
        )
    client = settings.MONAI_LABEL_AUTH_CLIENT_ID
    if client and claims.get("azp") not in (None, client):
        raise HTTPException(
            status_code=401, detail=f"the token was issued to client {claims['azp']!r}, not to {client!r}"
        )
    roles = claims
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    email, name = (claims.get(c) for c in (settings.MONAI_LABEL_AUTH_TOKEN_EMAIL, settings.MONAI_LABEL_AUTH_TOKEN_NAME))
    return User(
        username=username,
        email=email if isinstance(email, str) else None,
        name=name if isinstance(name, str) else None,
        roles=[r for r in roles if isinstance(r, str)] if isinstance(roles, list) else [],
    )


auth.from_token = from_token  # MONAI Label's RBAC looks it up at every request


def answer_first(app: FastAPI, endpoints: tuple) -> None:
    """The routes of ``endpoints`` ahead of every other (MONAI Label's own for the same paths and
    methods then answer no more)."""
    ours = [r for r in app.router.routes if getattr(r, "endpoint", None) in endpoints]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]
