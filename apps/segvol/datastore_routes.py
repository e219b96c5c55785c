"""The datastore, session and DICOMweb proxy routes, served instead of MONAI Label's own.

MONAI Label's versions open uploads by their file name's suffix, take ids as paths, run archive
and file work on the event loop (every other request waits), and let any signed-in user replace
the model file, store anything in the archive through the proxy or upload sessions of any
files. These keep the same paths and parameters, so OHIF and Slicer work unchanged, and differ
where it matters:
- who may call them is lib/team/access.py's policy (roles with authentication, switches without);
- ids are looked up among the datastore's own (lib/paths.py), uploads are bounded by
  ``--conf max_upload_mb`` and read by content (lib/labels/uploads.py);
- every route is a plain ``def``: FastAPI runs it in its thread pool, off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated

import requests
from fastapi import Depends, File, Form, HTTPException, Security, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from monailabel.app import app
from monailabel.config import settings
from monailabel.endpoints import datastore as monai_datastore
from monailabel.endpoints.user.auth import User, get_current_user
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

from lib.labels.uploads import UploadError, UploadTooLarge, check_image
from lib.paths import PathError, inside, new_id
from lib.paths import tag as checked_tag
from lib.serving.limits import check_json_text, check_sizes
from lib.serving.validation import RequestError, params_object
from lib.team.access import Action, Forbidden, Policy
from lib.team.held import HeldFull
from lib.team.identity import IdentityError, client_of, current_roles, current_user
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)


def _policy():
    return Policy(settings.MONAI_LABEL_AUTH_ENABLE, app_instance().service.settings.datastore_changes)


def allowed(action_name: str):
    """A dependency: the signed-in user (or, without authentication, MONAI Label's default user),
    refused with 403 naming what would allow it when the policy says no."""

    async def check(user: Annotated[User, Security(get_current_user)]) -> User:
        return require(action_name, user)

    return Depends(check)


def require(action_name: str, user: User) -> User:
    """``user`` when the policy allows the action, else 403 naming what would allow it."""
    try:
        _policy().check(Action[action_name], user.roles)
    except Forbidden as e:
        raise HTTPException(status_code=403, detail=str(e)) from e
    return user


Reader = Annotated[User, allowed("READ")]
Annotator = Annotated[User, allowed("ANNOTATE")]
Changer = Annotated[User, allowed("CHANGE_DATASTORE")]
Manager = Annotated[User, allowed("MANAGE")]


def _bad(e: Exception, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=str(e))


def json_params(text: str, what: str = "params") -> dict:
    try:
        check_json_text(text, what)
        value = params_object(text, what)
        check_sizes(value, what)
    except RequestError as e:
        raise _bad(e) from e
    except json.JSONDecodeError as e:
        raise _bad(ValueError(f"{what} is not valid JSON: {e}")) from e
    return value


def _max_bytes() -> int:
    return app_instance().service.settings.max_upload_bytes


def spool(upload: UploadFile, max_bytes: int) -> Path:
    """The upload in a temporary file of the server's own naming (never the client's name or
    suffix), refused with 413 past ``max_bytes``."""
    fd, name = tempfile.mkstemp(prefix="segvol-upload-", suffix=".upload")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(
                        status_code=413,
                        detail=f"the upload {upload.filename!r} is over {max_bytes / 2**20:g} MB "
                        "(--conf max_upload_mb)",
                    )
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def known_image(image: str) -> str:
    """``image`` when the datastore lists it, else 404 (an unknown id never becomes a path)."""
    if not app_instance().knows_image(image):
        raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
    return image


def who(client_id: object) -> str:
    """Who asks (lib/team/identity.py): the token's user, else the client id; 400 / 401 when unusable."""
    try:
        return client_of({"client_id": client_id})
    except IdentityError as e:
        raise HTTPException(status_code=e.status, detail=str(e)) from e


def _tag(tag: str) -> str:
    try:
        return checked_tag(tag)
    except PathError as e:
        raise _bad(e) from e


def _file(path: str, what: str, check_only: bool) -> Response:
    store = app_instance().datastore()
    try:
        real = inside(store.root, path) if path else None
    except PathError as e:
        raise HTTPException(status_code=404, detail=f"{what} not found ({e})") from e
    if real is None or not real.is_file():
        raise HTTPException(status_code=404, detail=f"{what} not found")
    if check_only:
        return Response(status_code=200)
    return FileResponse(real, filename=real.name, media_type="application/octet-stream")


# ------------------------------------------------------------------ reading
@app.get("/datastore/", summary="Images and labels of the datastore (stats, train or all)")
def datastore_list(user: Reader, output: monai_datastore.ResultType | None = None):
    return monai_datastore.datastore(output)


@app.head("/datastore/image", summary="Whether an image exists")
@app.get("/datastore/image", summary="Download an image")
def download_image(image: str, user: Reader, check_only: bool = False) -> Response:
    return _file(app_instance().datastore().get_image_uri(known_image(image)), f"image {image!r}", check_only)


@app.get("/datastore/image/info", summary="An image's info")
def image_info(image: str, user: Reader) -> dict:
    return app_instance().datastore().get_image_info(known_image(image))


@app.head("/datastore/label", summary="Whether a label exists")
@app.get("/datastore/label", summary="Download a label")
def download_label(
    label: str, tag: str, user: Reader, check_only: bool = False, client_id: str | None = None
) -> Response:
    """The label file; a final label that is another annotator's double reading, not yet paired,
    is not shown (404, as no label) to anyone but a reviewer and its reader."""
    hidden = _tag(tag) == DefaultLabelTag.FINAL.value and app_instance().team.final_hidden(
        known_image(label), who(client_id)
    )
    if hidden:
        raise HTTPException(status_code=404, detail=f"image {label!r} is read twice: its label shows once both are in")
    uri = app_instance().datastore().get_label_uri(known_image(label), _tag(tag))
    return _file(uri, f"label {label!r} ({tag})", check_only)


@app.get("/datastore/label/info", summary="A label's info")
def label_info(label: str, tag: str, user: Reader) -> dict:
    return app_instance().datastore().get_label_info(known_image(label), _tag(tag))


# ------------------------------------------------------------------ labels
@app.put("/datastore/label", summary="Save a label (checked, stored in the app's convention)")
def save_label(
    image: str,
    user: Annotator,
    params: Annotated[str, Form()] = "{}",
    tag: str = DefaultLabelTag.FINAL.value,
    label: Annotated[UploadFile, File()] = ...,
) -> dict:
    save_params = json_params(params)
    instance = app_instance()
    path = spool(label, _max_bytes())
    try:
        try:
            saved = instance.datastore().save(known_image(image), str(path), _tag(tag or "final"), save_params)
        except DatabaseUnavailable as e:  # nothing stored yet: the whole save is held, stored when it answers
            return _hold(image, _tag(tag or "final"), save_params, path, e)
        try:
            result = instance.on_save_label(image, saved.image) or {}
        except DatabaseUnavailable as e:  # the label is stored; the round check runs at the next save
            log.warning("after the save of %s: %s", image, e)
            result = {}
    finally:
        path.unlink(missing_ok=True)
    return dict(result, **saved.report(), image=image, label=saved.image)


def _hold(image: str, tag: str, params: dict, upload: Path, why: DatabaseUnavailable) -> JSONResponse:
    """A save held on this host while the team database does not answer (lib/team/held.py): 202."""
    who(params.get("client_id"))  # an unusable identity is refused now, not on replay
    try:
        sender = (current_user.get(), current_roles.get())
        held = app_instance().team.held.hold_save(image, tag, params, upload, sender, why)
    except HeldFull as e:
        raise HTTPException(status_code=503, detail=str(e)) from why
    return JSONResponse(status_code=202, content=held)


@app.delete("/datastore/label", summary="Delete a label (admin; off without sign-in)")
def remove_label(id: str, tag: str, user: Changer) -> dict:
    app_instance().datastore().remove_label(known_image(id), _tag(tag))
    return {}


def update_info(label: str, tag: str, info: dict) -> dict:
    return app_instance().datastore().update_label_info(known_image(label), _tag(tag), info)


@app.put("/datastore/label/info", summary="Rewrite a label's info (admin; off without sign-in)")
def put_label_info(label: str, tag: str, user: Changer, info: Annotated[str, Form()] = "{}"):
    return update_info(label, tag, json_params(info, "info"))


# ------------------------------------------------------------------ images
@app.put("/datastore/", include_in_schema=False)
@app.put("/datastore/image", summary="Add an image (admin; off without sign-in)")
def add_image(
    user: Changer,
    image: str | None = None,
    params: Annotated[str, Form()] = "{}",
    file: Annotated[UploadFile, File()] = ...,
) -> dict:
    info = json_params(params)
    try:
        image_id = new_id(image if image is not None else Path(file.filename or "").name.split(".")[0])
    except PathError as e:
        raise _bad(e) from e
    if app_instance().knows_image(image_id):
        raise HTTPException(status_code=409, detail=f"image {image_id!r} exists; delete it first or pick another id")
    path = spool(file, _max_bytes())
    try:
        try:
            ext = check_image(path, _max_bytes())
        except UploadTooLarge as e:
            raise _bad(e, 413) from e
        except UploadError as e:
            raise _bad(e) from e
        named = path.with_name(f"{path.stem}{ext}")
        path.rename(named)
        path = named
        return {"image": app_instance().datastore().add_image(image_id, str(path), info)}
    finally:
        path.unlink(missing_ok=True)


@app.delete("/datastore/", include_in_schema=False)
@app.delete("/datastore/image", summary="Delete an image and its labels (admin; off without sign-in)")
def remove_image(id: str, user: Changer) -> dict:
    app_instance().datastore().remove_image(known_image(id))
    return {}


@app.put("/datastore/image/info", summary="Rewrite an image's info (admin; off without sign-in)")
def put_image_info(image: str, user: Changer, info: Annotated[str, Form()] = "{}"):
    return app_instance().datastore().update_image_info(known_image(image), json_params(info, "info"))


# ------------------------------------------------------------------ the archive, read-only, for OHIF
def _archive_get(prefix: str | None, path: str) -> Response:
    """A GET on the archive's DICOMweb service (what OHIF's study list and viewer read). Only
    plain relative paths of DICOMweb resources; writing to the archive goes through label saves."""
    parts = path.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "%" in p for p in parts):
        raise HTTPException(status_code=400, detail=f"{path!r} is not a DICOMweb resource path")
    if set(parts) & app_instance().team.hidden_series(who(None)):  # a double reading, not yet paired
        raise HTTPException(status_code=404, detail="that SEG is one of a double reading, shown once both are in")
    if not settings.MONAI_LABEL_STUDIES.startswith(("http://", "https://")):
        raise HTTPException(status_code=404, detail="the datastore is a folder, not a DICOMweb archive")
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    base = "/".join(x.strip("/") for x in (settings.MONAI_LABEL_STUDIES, prefix or "") if x.strip("/"))
    try:
        answer = requests.get(
            f"{base}/{path}", auth=(user, password) if user and password else None, timeout=(10, 60), stream=True
        )
    except requests.RequestException as e:
        raise HTTPException(status_code=503, detail=f"the DICOMweb archive does not answer ({e})") from e
    keep = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "etag", "last-modified")}

    def body():  # streamed: a whole series never sits in the server's memory
        try:
            yield from answer.iter_content(1 << 20)
        finally:
            answer.close()

    return StreamingResponse(body(), status_code=answer.status_code, headers=keep)


@app.get("/proxy/dicom/wado/{path:path}", include_in_schema=False)
def proxy_wado(path: str, user: Reader) -> Response:
    return _archive_get(settings.MONAI_LABEL_WADO_PREFIX, path)


@app.get("/proxy/dicom/qido/{path:path}", include_in_schema=False)
def proxy_qido(path: str, user: Reader) -> Response:
    prefix = settings.MONAI_LABEL_WADO_PREFIX if path.endswith("metadata") else settings.MONAI_LABEL_QIDO_PREFIX
    return _archive_get(prefix, path)


# MONAI Label's routes this app retires, answered first (ahead of MONAI Label's own, which stay
# registered) with the reason; every method MONAI Label serves on each path
RETIRED = {
    "/proxy/dicom/wado/{path:path}": (["POST"], "the archive is read through this proxy, never written"),
    "/proxy/dicom/qido/{path:path}": (["POST"], "the archive is read through this proxy, never written"),
    "/proxy/dicom/stow/{path:path}": (["GET", "POST"], "labels reach the archive as checked saves only"),
    "/proxy/dicom/{path:path}": (["GET", "POST"], "only the archive's DICOMweb (qido, wado) is proxied"),
    "/model/{model}": (["PUT", "DELETE"], "weights come from --conf weights, new versions from rounds"),
    "/session/": (["PUT"], "the tasks segment the datastore's images only"),
    "/session/{session_id}": (["GET", "DELETE"], "the tasks segment the datastore's images only"),
    "/infer/wsi/{model}": (["POST"], "SegVol segments CT volumes of the datastore through /infer/{model}"),
    "/infer/wsi_v2/{model}": (["POST"], "SegVol segments CT volumes of the datastore through /infer/{model}"),
    "/scoring/": (["GET", "POST", "DELETE"], "the app has no scoring methods (the uncertainty strategy scores)"),
    "/scoring/{method}": (["POST"], "the app has no scoring methods (the uncertainty strategy scores)"),
    "/reload": (["POST"], "the app is built once per process; restart the server to reload it"),
    "/datastore/dataset": (["GET"], "export labels from the archive or the datastore folder itself"),
}


def _retired(path: str, why: str):
    def retired() -> None:
        raise HTTPException(status_code=404, detail=f"{path} is not served by segvol-label: {why}")

    return retired


RETIRED_ROUTES = []
for _path, (_methods, _why) in RETIRED.items():
    app.add_api_route(_path, _retired(_path, _why), methods=_methods, include_in_schema=False)
    RETIRED_ROUTES.append(app.router.routes[-1].endpoint)

ROUTES = (
    datastore_list,
    download_image,
    image_info,
    download_label,
    label_info,
    save_label,
    remove_label,
    put_label_info,
    add_image,
    remove_image,
    put_image_info,
    proxy_wado,
    proxy_qido,
    *RETIRED_ROUTES,
)
