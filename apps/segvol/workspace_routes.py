"""The OHIF workspace's own routes: an annotator's autosaved work, the label catalogue with its
colours, and the round status MONAI Label's panel asks for.

Every route is a plain ``def`` (FastAPI runs it in its thread pool, off the event loop) and takes
who asks from lib/team/identity.py: with authentication on, the token's user, so an autosave is
only ever handed to the annotator who made it.
"""

from __future__ import annotations

import json
import zlib
from typing import Annotated

import numpy as np
from datastore_routes import Annotator, Reader, json_params, known_image, spool, who
from fastapi import File, Form, HTTPException, Query, UploadFile
from fastapi.responses import Response
from monailabel.app import app
from monailabel.endpoints import train
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.utils import processes

from lib.labels.colours import catalog
from lib.team.autosaves import AutosaveError
from lib.team.conflicts import based_on


def _autosaves():
    autosaves = app_instance().team.autosaves
    if autosaves is None:
        raise HTTPException(status_code=503, detail="the team store is not open yet: try again in a moment")
    return autosaves


def checked_shape(shape: object, max_voxels: int) -> tuple[int, int, int]:
    """The grid the work claims: three positive integers, at most ``max_voxels`` in all."""
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        raise AutosaveError(f"shape must be the labelmap's [nx, ny, nz], got {shape!r}")
    if int(np.prod(shape)) > max_voxels:
        raise AutosaveError(f"shape {shape} is over {max_voxels} voxels (--conf max_upload_mb)")
    return tuple(shape)


def inflated(body: bytes, encoding: object, voxels: int) -> bytes:
    """The labelmap's bytes: as sent (``raw``) or gunzipped (``gzip``, what the page sends), never
    inflated past one byte more than the image has voxels."""
    if encoding == "raw":
        return body
    if encoding != "gzip":
        raise AutosaveError(f"encoding must be 'raw' or 'gzip', got {encoding!r}")
    try:
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, voxels + 1)
    except zlib.error as e:
        raise AutosaveError(f"the gzip body cannot be read: {e}") from e
    return out


@app.put("/segvol/autosave", summary="Keep this annotator's unsaved work on an image (not a label)")
def put_autosave(
    image: str,
    user: Annotator,
    params: Annotated[str, Form()] = "{}",
    label: Annotated[UploadFile, File()] = ...,
) -> dict:
    """``label``: the page's labelmap, raw uint8 (index i + nx*j + nx*ny*k) or gzipped; ``params``:
    client_id, shape [nx, ny, nz], label_info [{value, name}] for every value in it, based_on (the
    final label it started from), encoding. The image itself is not read: a save of it may be
    fetching it from the archive at this moment, and the page checks the shape when it restores."""
    asked = json_params(params)
    client = who(asked.get("client_id"))
    try:
        base, _ = based_on(asked)
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    known_image(image)
    max_bytes = app_instance().service.settings.max_upload_bytes
    path = spool(label, max_bytes)
    try:
        shape = checked_shape(asked.get("shape"), max_bytes)
        voxels = inflated(path.read_bytes(), asked.get("encoding", "raw"), int(np.prod(shape)))
        saved = _autosaves().put(image, client, voxels, shape, asked.get("label_info"), base)
    except AutosaveError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    finally:
        path.unlink(missing_ok=True)
    return dict(saved.header(), client=client, segments=len(saved.names))


@app.get("/segvol/autosave", summary="This annotator's autosaved work on an image: raw uint8, Fortran order")
def get_autosave(image: str, user: Reader, client_id: str | None = None) -> Response:
    client = who(client_id)
    saved = _autosaves().get(known_image(image), client)
    if saved is None:
        raise HTTPException(status_code=404, detail=f"no autosaved work of {client} on image {image!r}")
    return Response(
        saved.voxels,
        media_type="application/octet-stream",
        headers={
            "X-SegVol-Labels": json.dumps({str(k): v for k, v in sorted(saved.names.items())}),
            "X-SegVol-Autosave": json.dumps(saved.header()),
        },
    )


@app.delete("/segvol/autosave", summary="Discard this annotator's autosaved work on an image")
def delete_autosave(image: str, user: Annotator, client_id: str | None = None) -> dict:
    client = who(client_id)
    return {"dropped": _autosaves().drop(known_image(image), client)}


@app.get("/segvol/categories", summary="Every SegVol category with its colour, the team's configured ones first")
def categories(user: Reader) -> list[dict]:
    """What the page searches and paints with; the SEGs carry the same colours."""
    service = app_instance().service
    return catalog(service.vocabulary, service.settings.categories)


@app.get("/train/", summary="The fine-tune round's task (MONAI Label's), or whether one runs")
def train_status(user: Reader, check_if_running: bool = False, every: Annotated[bool, Query(alias="all")] = False):
    """MONAI Label's answer, except that "is one running?" with none running is a 200 saying so:
    MONAI Label answers it 404, which OHIF's panel logs as an error on every page load."""
    if check_if_running and not processes("train"):
        return {"status": "NOT RUNNING"}
    return train.status(every, check_if_running)


ROUTES = (put_autosave, get_autosave, delete_autosave, categories, train_status)
