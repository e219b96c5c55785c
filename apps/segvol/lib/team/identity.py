"""Who is asking: the signed-in user when MONAI Label's authentication is on, else the
``client_id`` the client sends in its params (3D Slicer and MONAILabelClient send one; the OHIF
SegVol mode sends the annotator name set in its panel). Without authentication a client id is a
name, not a proof: anyone may send any name (docs/security.md). Leases, provenance and the SEG's
ContentCreatorName are keyed by it."""

from __future__ import annotations

import re
from contextvars import ContextVar

from monailabel.config import settings

# set per request by server.py's middleware when MONAI Label's authentication is enabled
current_user: ContextVar[str | None] = ContextVar("segvol_current_user", default=None)
current_roles: ContextVar[tuple[str, ...]] = ContextVar("segvol_current_roles", default=())

CLIENT = re.compile(r"^[^\x00-\x1f\x7f\\=]{1,128}$")
ANONYMOUS = "anonymous"


class IdentityError(ValueError):
    """A client id that cannot be used; the message says why."""

    status = 400


class NotSignedIn(IdentityError):
    """Authentication is on and the request names no signed-in user (HTTP 401)."""

    status = 401


def usable_name(value: object, strip: bool = True) -> str | None:
    """``value`` as an identity, or None when it cannot be one: 1 to 128 printable characters
    (``str.isprintable``: no control, format, surrogate or separator characters but the space),
    no backslash or '='. A token's name must be so exactly (``strip`` False): "bob" and
    "bob\u3000" are never one person."""
    if not isinstance(value, str):
        return None
    name = value.strip() if strip else value
    if not CLIENT.match(name) or not name.isprintable() or name != name.strip():
        return None
    return name


def client_of(params: dict | None) -> str:
    """Who asks. With authentication on, the token's user and nothing else: a ``client_id`` in the
    request is ignored, and a request that reached here without a signed-in user is refused."""
    user = current_user.get()
    if user:
        return user
    if settings.MONAI_LABEL_AUTH_ENABLE:
        raise NotSignedIn("no signed-in user: send a bearer token (MONAI Label's authentication is on)")
    value = (params or {}).get("client_id")
    if value is None:
        return ANONYMOUS
    name = usable_name(value)
    if name is None:
        raise IdentityError(f"client_id {value!r} is not usable: 1 to 128 printable characters, no backslash or '='")
    return name
