"""Who is asking: the signed-in user when MONAI Label's authentication is on, else the
``client_id`` the client sends in its params (3D Slicer and MONAILabelClient send one; the OHIF
SegVol mode sends the annotator name set in its panel). Leases, provenance and the SEG's
ContentCreatorName are keyed by it."""

from __future__ import annotations

import re
from contextvars import ContextVar

# set per request by server.py's middleware when MONAI Label's authentication is enabled
current_user: ContextVar[str | None] = ContextVar("segvol_current_user", default=None)

CLIENT = re.compile(r"^[^\x00-\x1f\x7f\\=]{1,128}$")
ANONYMOUS = "anonymous"


class IdentityError(ValueError):
    """A client id that cannot be used; the message says why."""


def client_of(params: dict | None) -> str:
    user = current_user.get()
    if user:
        return user
    value = (params or {}).get("client_id")
    if value is None:
        return ANONYMOUS
    if not isinstance(value, str) or not CLIENT.match(value.strip()):
        raise IdentityError(f"client_id {value!r} is not usable: 1 to 128 printable characters, no backslash or '='")
    return value.strip()


def person_name(client: str) -> str:
    """A DICOM person name (PN) for an annotator: "Jane Doe" -> "Doe^Jane", one word as the
    family name ("annotator-3f9a^": without the '^' it reads as the retired free-text form), a
    value that already has '^' as it is; 64 characters at most."""
    if "^" in client:
        return client[:64]
    parts = client.split()
    if len(parts) > 1:
        return f"{parts[-1]}^{' '.join(parts[:-1])}"[:64]
    return f"{client[:63]}^"
