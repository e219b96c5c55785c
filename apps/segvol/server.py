"""The ASGI app: MONAI Label's, with errors a client causes answered as 4xx with a message, the
SegVol mode for OHIF, and the team workspace's routes (next image with leases, status, label
history).

Run through MONAI Label's launcher: ``--uvicorn_app server:app`` (apps/segvol on PYTHONPATH).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Annotated

import datastore_routes
import monailabel
import monailabel.endpoints.user.auth as auth
import numpy as np
import requests
import review_routes
import workspace_routes
from datastore_routes import Annotator, Manager, Reader, known_image, who
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.app import app
from monailabel.config import settings
from monailabel.endpoints import batch_infer, train
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.logs import get_logs
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.utils import processes

from lib.compat.server import answer_first, as_client_mistake, from_token
from lib.paths import PathError, inside
from lib.rounds.progress import RUNNING, RoundProgress
from lib.serving.limits import check_json_text, check_sizes
from lib.serving.validation import RequestError, params_object
from lib.team.identity import current_roles, current_user
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)
NOTHING_LEFT = "Nothing left to annotate: every image in the datastore has a final label."
SERIES_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


@app.exception_handler(json.JSONDecodeError)
async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})


@app.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> Response:
    return await http_exception_handler(request, as_client_mistake(exc))


@app.exception_handler(DatabaseUnavailable)
async def team_database_down(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
    """A team route while the team database does not answer: 503 naming it (inference goes on, saves are held)."""
    log.warning("%s %s: 503, %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=503,
        content={
            "detail": f"{exc}. Team features (leases, history, reviews, autosave) wait for it; segmentation "
            "goes on, and label saves are kept on this server and stored when it answers."
        },
    )


@app.exception_handler(MONAILabelException)
async def monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


@app.middleware("http")
async def identify(request: Request, call_next):
    """With MONAI Label's authentication on, the signed-in user is who asks (lib/team/identity.py);
    a bad token is left to MONAI Label's own check, which answers 401."""
    if settings.MONAI_LABEL_AUTH_ENABLE:
        header = request.headers.get("authorization", "")
        user, roles = None, ()
        if header.lower().startswith("bearer "):
            try:
                token = from_token(header[7:].strip())
                user, roles = token.username, tuple(token.roles or ())
            except Exception:  # an invalid or expired token: RBAC refuses the request
                user, roles = None, ()

        current_user.set(user)
        current_roles.set(roles)
    return await call_next(request)


class BodyLimit:
    """Refuses a request body past its bound with 413 while it arrives, before anything parses
    or spools it. The bound is the route's, never the client's say: the label and image uploads
    may carry ``--conf max_upload_mb`` and a little form overhead, every other request 1 MB. With
    authentication on, a body past 1 MB needs a valid bearer token before it is read."""

    SMALL = 1 << 20
    UPLOADS = {
        ("PUT", "/datastore/label"),
        ("PUT", "/datastore/image"),
        ("PUT", "/datastore/"),
        ("PUT", "/segvol/autosave"),
    }

    def __init__(self, app) -> None:
        self.app = app

    def limit(self, scope) -> int:
        if (scope["method"], scope["path"]) not in self.UPLOADS:
            return self.SMALL
        try:
            return app_instance().service.settings.max_upload_bytes + self.SMALL
        except Exception:  # before the app is built: the default bound
            return 1024 * 2**20 + self.SMALL

    @staticmethod
    async def refuse(scope, receive, send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if sum(1 for k, _ in headers if k == b"content-type") > 1:
            return await self.refuse(scope, receive, send, 400, "more than one Content-Type header")
        limit = self.limit(scope)
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self.refuse(scope, receive, send, 413, f"the request body is over {limit / 2**20:g} MB")
        big = int(declared) > self.SMALL if declared and declared.isdigit() else b"transfer-encoding" in dict(headers)
        if settings.MONAI_LABEL_AUTH_ENABLE and big:
            bearer = dict(headers).get(b"authorization", b"").decode("latin-1")
            try:
                if not bearer.lower().startswith("bearer "):
                    raise HTTPException(status_code=401, detail="a body over 1 MB needs a bearer token")
                await run_in_threadpool(from_token, bearer[7:].strip())
            except HTTPException as e:
                return await self.refuse(scope, receive, send, e.status_code, str(e.detail))
        too_large = HTTPException(status_code=413, detail=f"the request body is over {limit / 2**20:g} MB")
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large
            return message

        await self.app(scope, bounded, send)


app.add_middleware(BodyLimit)

REPLICA = os.environ.get("SEGVOL_REPLICA") or f"{socket.gethostname()}:{os.getpid()}"


@app.middleware("http")
async def replica_header(request: Request, call_next):
    """Which server process answered (X-SegVol-Replica): behind HAProxy, the replica's name."""
    response = await call_next(request)
    response.headers["X-SegVol-Replica"] = REPLICA
    return response


@app.get("/segvol/health", summary="200 once the model is loaded, else 503 (for load balancers)")
async def health() -> JSONResponse:
    """What a load balancer's health check asks: no sign-in, no model run, no datastore scan;
    on the event loop itself (it only reads attributes), so no busy thread pool delays it."""
    service = app_instance().service
    ready = service.predictor is not None
    body = {"replica": REPLICA, "ready": ready, "model_version": service.version, "error": service.error}
    return JSONResponse(body, status_code=200 if ready else 503)


OHIF_CONFIG = Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif" / "app-config.js"
# the SegVol mode: the shim of the OHIF build first (it checks that build), the segments, the box
# prompt, the workspace panel, then the workspace and the mode
MODE_FILES = ("ohif-shim.js", "segments.js", "box-prompt.js", "workspace-panel.js", "review-panel.js", "segvol-mode.js")
SEGVOL_MODE = tuple(Path(__file__).parent / "static" / name for name in MODE_FILES)


def _checked(fn, *args):
    """``fn(*args)``, a RequestError answered 400 with its message."""
    try:
        return fn(*args)
    except RequestError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e


def _bounded(params: object, what: str = "params") -> None:
    """Every list, string and number in a request's parameters within lib/serving/limits.py's bounds."""
    _checked(check_sizes, params, what)


@app.get("/info/", summary="The app: tasks, labels, datastore counts, model version")
def info(user: Reader) -> dict:
    """MONAI Label's, off the event loop: counting the datastore may ask the archive."""
    return app_instance().info()


@app.get("/logs/", summary="The server's log (MONAI Label's view of it)", include_in_schema=False)
def logs(user: Manager, lines: int = 300, html: bool = True, text: bool = False, refresh: int = 0) -> Response:
    """MONAI Label's, off the event loop (it reads the whole file), with its numbers bounded."""
    if not 0 <= lines <= 100_000 or not 0 <= refresh <= 3600:
        raise HTTPException(status_code=400, detail="lines must be 0 to 100000 and refresh 0 to 3600 seconds")
    return get_logs(os.path.join(settings.MONAI_LABEL_APP_DIR, "logs", "app.log"), lines, html, text, refresh)


@app.get("/ohif/app-config.js", include_in_schema=False)
def ohif_config() -> Response:
    """OHIF's configuration, plus the SegVol mode (static/ohif-shim.js, then static/segvol-mode.js)."""
    parts = [OHIF_CONFIG.read_text(), *(part.read_text() for part in SEGVOL_MODE)]
    return Response("\n".join(parts), media_type="application/javascript")


@app.get("/ohif/{path:path}", include_in_schema=False)
def ohif_file(path: str, user: Reader) -> FileResponse:
    """OHIF's files (MONAI Label's bundle); any other path is the page itself (OHIF routes in the
    browser). A path is proven inside the bundle's folder (MONAI Label's answered 500 to '..')."""
    folder = OHIF_CONFIG.parent
    try:
        file = inside(folder, path) if path else folder / "index.html"
    except PathError:
        file = folder / "index.html"
    return FileResponse(file if file.is_file() else folder / "index.html")


@app.post("/auth/token", include_in_schema=False)
def access_token(form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> dict:
    """MONAI Label's sign-in with a user name and password (Slicer's), off the event loop; the
    realm refusing them is a 401, the realm not answering a 503."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return {"access_token": None, "token_type": None}
    data = {
        "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID,
        "username": form.username,
        "password": form.password,
        "grant_type": "password",
    }
    try:
        answer = requests.post(auth.token_uri(), data=data, timeout=30)
    except requests.RequestException as e:
        raise HTTPException(status_code=503, detail=f"the sign-in realm does not answer ({e})") from e
    if answer.status_code in (400, 401, 403):
        raise HTTPException(status_code=401, detail="the realm refused this user name and password")
    if not answer.ok:
        raise HTTPException(status_code=502, detail=f"the sign-in realm answered HTTP {answer.status_code}")
    return answer.json()


@app.post("/activelearning/{strategy}", summary="Next image for this client, leased to it")
def next_image(strategy: str, user: Annotator, params: dict | None = None) -> dict:
    """MONAI Label's next sample, run off the event loop (a strategy may encode images), through
    the app's leases; when nothing is left, a message that says so."""
    _bounded(params)
    asked = dict(params or {}, client_id=who((params or {}).get("client_id")))  # what MONAI Label records
    return app_instance().sample(strategy, asked, user.username) or {"message": NOTHING_LEFT}


@app.post("/infer/{model}", summary="Run inference (params: a JSON object)")
def infer(
    background_tasks: BackgroundTasks,
    model: str,
    user: Annotator,
    image: str = "",
    session_id: str = "",
    params: Annotated[str, Form()] = "{}",
    file: Annotated[UploadFile | None, File()] = None,
    label: Annotated[UploadFile | None, File()] = None,
    output: ResultType | None = None,
):
    """MONAI Label's inference, with ``params`` checked to be a bounded JSON object first (MONAI
    Label answers null or a string with a 500), run off the event loop. The tasks segment the
    datastore's images only: an uploaded image, label or session, or params that would replace
    the image or model MONAI Label passes on, are refused."""
    _checked(check_json_text, params)
    asked = _checked(params_object, params)
    _bounded(asked)
    refused = [k for k, v in (("file", file), ("label", label), ("session_id", session_id)) if v]
    refused += sorted(k for k in asked if k in ("image", "image_id", "model", "session", "save_label", "label_tag"))
    if refused:
        raise HTTPException(
            status_code=400,
            detail=f"infer takes the image as ?image=<an id from /datastore/>; not accepted here: {', '.join(refused)}",
        )
    return run_inference(background_tasks, model, image, session_id, params, file, label, output)


def _trainer(model: str):
    trainer = app_instance().trainers.get(model)
    if trainer is None:
        raise HTTPException(
            status_code=404, detail=f"no trainer {model!r}; available: {', '.join(app_instance().trainers)}"
        )
    return trainer


@app.post("/train/{model}", summary="Start a fine-tune round (parameters checked before anything starts)")
def train_model(model: str, user: Manager, params: dict | None = None, run_sync: bool = False, enqueue: bool = False):
    _bounded(params)
    _checked(_trainer(model).check_params, params or {})
    return train.run_model(model, params, run_sync, enqueue)


@app.post("/train/", summary="Start a round of every trainer", include_in_schema=False)
def train_all(user: Manager, params: dict | None = None, run_sync: bool = False):
    _bounded(params)
    for model, asked in (params or {}).items():
        if not isinstance(asked, dict):
            raise HTTPException(status_code=400, detail=f"params[{model!r}] must be a JSON object")
        _checked(_trainer(model).check_params, asked)
    return train.run(params, run_sync)


@app.post("/batch/infer/{model}", summary="Run a task over the datastore (parameters checked before it starts)")
def batch(model: str, user: Manager, images: batch_infer.BatchInferImageType = "all", params: dict | None = None):
    task = app_instance().infers.get(model)
    if task is None:
        raise HTTPException(
            status_code=404, detail=f"no model {model!r}; available: {', '.join(app_instance().infers)}"
        )
    _bounded(params)
    _checked(task.check_batch_params, params or {})
    return batch_infer.run(model, images, params)


@app.get("/segvol/status", summary="Served model, this client's lease and last result, the fine-tune round")
def status(user: Reader, client_id: str | None = None, image: str | None = None) -> dict:
    instance = app_instance()
    service = instance.service
    client = who(client_id)
    if service.lock.acquire(blocking=False):  # a promotion shows at once, unless a request is running
        try:
            service.sync_version()
        finally:
            service.lock.release()
    versions = service.versions
    names = versions.names()
    team = instance.team
    leases = team.leases
    lease = leases.held_by(client) if leases else None
    others = leases.of_others(client).get(image, []) if leases and image else []
    provenance = team.provenance
    round_ = RoundProgress(versions.root).read()
    last = (round_ or {}).get("result") or (dict(versions.meta(names[-1]), version=names[-1]) if names else None)
    running = [p.pid for p in processes("train").values()]
    if running and (round_ or {}).get("pid") not in running:  # a round's process that has not written yet
        round_ = {"state": RUNNING, "stage": "starting", "done": 0, "total": 0, "pid": running[0]}
    return {
        "model_version": service.version,
        "active": versions.active(),
        "client": client,
        "lease": lease.as_json(leases.clock()) if lease else None,
        "image_held_by": [other.as_json(leases.clock()) for other in others],
        "last_result": provenance.last_result(client=client, image=image) if provenance else None,
        "newest_label": team.final_saves.newest(image, team.blind(image, client))
        if team.final_saves and image
        else None,
        "round": round_,
        "last_round": last,
        "warning": service.warning,
        "error": service.error,
        "unreadable_images": team.unreadable.as_json(),
        "scoring": instance.scorer.progress() if team.store is not None else None,
        "pending_segs": _pending(instance.datastore()),
        "held_saves": team.held.pending() if team.held is not None else [],
    }


def _pending(store) -> dict | None:
    """SEGs waiting for the archive and those it refused (None on a folder datastore)."""
    outbox = getattr(store, "outbox", None)
    return outbox.state() if outbox is not None else None


@app.post("/segvol/pending/retry", summary="Send the SEGs the archive refused again (after fixing the archive)")
def retry_pending(user: Manager) -> dict:
    outbox = getattr(app_instance().datastore(), "outbox", None)
    if outbox is None:
        raise HTTPException(status_code=404, detail="the datastore is a folder: no SEGs are sent to an archive")
    sent = outbox.retry_refused()
    return {"sent": sent, **outbox.state()}


@app.get("/segvol/labels", summary="Every label saved for an image, newest first (the archive's SEGs)")
def label_history(image: str, user: Reader, client_id: str | None = None) -> list[dict]:
    """Newest first; another annotator's double reading is left out until both readings are in."""
    hidden = app_instance().team.blind(known_image(image), who(client_id))
    return [s for s in app_instance().datastore().history(image) if s.get("version") not in hidden]


@app.get("/segvol/labels/voxels", summary="A saved label on the image grid: raw uint8, Fortran order")
def label_voxels(image: str, user: Reader, seg: str | None = None, client_id: str | None = None) -> Response:
    """The image's final label, or the SEG series ``seg``, as OHIF's labelmap layout (index
    i + nx*j + nx*ny*k) with values = /info label indices; header X-SegVol-Labels: value -> name.
    Another annotator's double reading is not shown until both readings are in (404, as no label)."""
    if seg is not None and not SERIES_UID.match(seg):
        raise HTTPException(status_code=400, detail=f"seg {seg!r} is not a DICOM UID")
    team = app_instance().team
    client = who(client_id)
    if team.final_hidden(known_image(image), client) if seg is None else seg in team.hidden_series(client):
        raise HTTPException(
            status_code=404,
            detail=f"image {image!r} is read twice: the other reading is shown once yours is saved",
        )
    label, names = app_instance().datastore().label_voxels(image, seg)
    return Response(
        np.asarray(label, np.uint8).tobytes(order="F"),
        media_type="application/octet-stream",
        headers={"X-SegVol-Labels": json.dumps({str(k): v for k, v in sorted(names.items())})},
    )


# ahead of MONAI Label's own routes (the same paths and methods, which answer no more; and the
# /ohif/{path} catch-all)
OVERRIDES = (info, logs, ohif_config, ohif_file, access_token, next_image, infer, train_model, train_all, batch)
OVERRIDES += datastore_routes.ROUTES + workspace_routes.ROUTES + review_routes.ROUTES
answer_first(app, OVERRIDES)

__all__ = ["app"]
