"""The review routes: who the asker is to the team, the reviewer's queue and actions, the labels
returned to an annotator, a double reading's voxels, and the team's figures.

The state lives in the team store (lib/team/reviews.py, lib/team/double_reading.py); these are thin:
who asks (lib/team/identity.py), whether they may (lib/team/roles.py: 403 otherwise), and the
answer. A reviewer's corrected version is a normal final save with ``review_of`` (lib/labels/save.py);
adopting one reading of a double-read pair is the same save, made here from the kept reading.
Every route is a plain ``def``: FastAPI runs it in its thread pool, off the event loop.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Annotated, Literal

import numpy as np
from datastore_routes import Annotator, Reader, json_params, known_image, require, update_info, who
from fastapi import Body, Form, HTTPException
from fastapi.responses import Response
from monailabel.app import app
from monailabel.interfaces.utils.app import app_instance

from lib.datastores.checked import write_nifti_like
from lib.serving.limits import MAX_NAME_CHARS
from lib.team.figures import as_csv, team_figures
from lib.team.identity import usable_name
from lib.team.reviews import ReviewError
from lib.team.team import Team


def _team() -> Team:
    team = app_instance().team
    if team.reviews is None:
        raise HTTPException(status_code=503, detail="the team store is not open yet: try again in a moment")
    return team


def _reviewer(client: str) -> Team:
    team = _team()
    if not team.roles.reviewer(client):
        raise HTTPException(
            status_code=403,
            detail=f"{client} is not a reviewer (with sign-in: the reviewer or admin role; without: --conf reviewers)",
        )
    return team


def _refused(e: ReviewError) -> HTTPException:
    return HTTPException(status_code=e.status, detail=e.as_detail())


@app.get("/segvol/whoami", summary="Who the server takes the asker for, and their roles in the team")
def whoami(user: Reader, client_id: str | None = None) -> dict:
    client = who(client_id)
    team = app_instance().team
    settings = app_instance().service.settings
    return {
        "client": client,
        "roles": team.roles.of(client),
        "reviewer": team.roles.reviewer(client),
        "admin": "admin" in team.roles.of(client),
        "self_review": settings.self_review,
        "train_on": settings.train_on,
        "double_read_fraction": settings.double_read_fraction,
    }


@app.get("/segvol/review/queue", summary="Final labels awaiting review, oldest first (reviewers)")
def review_queue(
    user: Reader, client_id: str | None = None, annotator: str | None = None, category: str | None = None
) -> dict:
    """Each label with its segments' provenance, the model version, a resubmission's earlier return,
    and a double-read pair's readers and agreement. Never the reviewer's own unless --conf self_review."""
    client = who(client_id)
    team = _reviewer(client)
    for name, value in (("annotator", annotator), ("category", category)):
        if value is not None and not 0 < len(value) <= MAX_NAME_CHARS:
            raise HTTPException(status_code=400, detail=f"{name} must be 1 to {MAX_NAME_CHARS} characters")
    saves: dict[int, dict] = {}
    items = []
    for review in team.reviews.pending():
        if review["annotator"] == client and not team.roles.self_review:
            continue
        if annotator is not None and review["annotator"] != annotator and not _pair_has(team, review, annotator):
            continue
        if review["image"] not in saves:
            saves.update({s["version"]: s for s in team.history(review["image"])})
        save = saves.get(review["version"], {})
        names = [s["name"] for s in save.get("segments", [])]
        if category is not None and category not in names:
            continue
        items.append(_item(team, review, save))
    return {"items": items}


def _pair_has(team: Team, review: dict, annotator: str) -> bool:
    other = team.reviews.of(review["pair"]) if review["pair"] else None
    return other is not None and other["annotator"] == annotator


def _item(team: Team, review: dict, save: dict) -> dict:
    resubmits = team.reviews.of(review["resubmits"]) if review["resubmits"] else None
    item = {
        "version": review["version"],
        "image": review["image"],
        "annotator": review["annotator"],
        "time": review["time"],
        "minutes_waiting": review["minutes_waiting"],
        "model_version": save.get("model_version"),
        "seg_series": save.get("seg_series"),
        "segments": save.get("segments", []),
        "resubmits": resubmits
        and {
            "version": resubmits["version"],
            "comment": resubmits["comment"],
            "segments": resubmits["segments"],
            "reviewer": resubmits["reviewer"],
        },
        "double_read": None,
    }
    if review["pair"]:
        other = team.reviews.of(review["pair"])
        item["double_read"] = {
            "versions": [review["version"], review["pair"]],
            "annotators": [review["annotator"], other["annotator"] if other else None],
            "agreement": team.double.measure(review["version"], review["pair"]),
        }
    return item


@app.post("/segvol/review", summary="Approve or return a final label, or adopt one reading of a pair (reviewers)")
def review(
    user: Annotator,
    version: Annotated[int, Body()],
    action: Annotated[Literal["approve", "return", "adopt"], Body()],
    client_id: Annotated[str | None, Body()] = None,
    comment: Annotated[str | None, Body()] = None,
    segments: Annotated[dict[str, str] | None, Body()] = None,
) -> dict:
    """``return`` needs a comment (the whole label's, or per segment name in ``segments``). On a
    double-read pair ``approve`` adopts that reading: saved again as the image's final label,
    signed by the reviewer. Two reviewers at once: one wins, the other is told (409)."""
    client = who(client_id)
    team = _reviewer(client)
    try:
        current = team.reviews.of(version)
        if action == "adopt" or (action == "approve" and current is not None and current["pair"]):
            return _adopt(team, version, client)
        return team.reviews.act(version, client, action, comment, segments, team.roles.self_review)
    except ReviewError as e:
        raise _refused(e) from e


def _adopt(team: Team, version: int, reviewer: str) -> dict:
    """One reading of a double-read pair becomes the image's final label: saved again, as it is,
    through the save pipeline (a SEG signed by the reviewer on an archive), with ``review_of``."""
    review = team.reviews.check_correction(version, reviewer, team.roles.self_review)
    if not review["pair"]:
        raise ReviewError(f"version {version} is not one of a double reading: approve it instead")
    kept = team.double.reading(version)
    if kept is None:
        raise ReviewError(f"the voxels of reading {version} are not in the team store", 410)
    label, names, _ = kept
    datastore = app_instance().datastore()
    image = known_image(review["image"])
    fd, path = tempfile.mkstemp(prefix="segvol-adopt-", suffix=".nii.gz")
    os.close(fd)
    try:
        write_nifti_like(datastore.get_image_uri(image), label, path)
        params = {
            "client_id": reviewer,
            "label_info": [{"name": name, "idx": value} for value, name in sorted(names.items())],
            "review_of": version,
        }
        saved = datastore.save(image, path, "final", params)
    finally:
        os.unlink(path)
    out = team.reviews.of(version)
    return dict(out, new_version=saved.info.get("version"), saved=saved.report())


@app.get("/segvol/review/returned", summary="This annotator's labels returned by a reviewer, not yet resubmitted")
def review_returned(user: Reader, client_id: str | None = None) -> dict:
    return {"items": _team().reviews.returned_to(who(client_id))}


@app.get("/segvol/review/image", summary="The review of an image's labels, as the asker may see it")
def review_image(image: str, user: Reader, client_id: str | None = None) -> dict:
    client = who(client_id)
    team = _team()
    known_image(image)
    hidden = team.blind(image, client)
    labels, events = team.reviews.of_image(image)
    return {
        "image": image,
        "double_read": team.double.chosen(image),
        "labels": [r for r in labels if r["version"] not in hidden],
        "events": [e for e in events if e["version"] not in hidden],
    }


@app.get("/segvol/reading", summary="One reading of a double-read image: raw uint8, Fortran order")
def reading(version: int, user: Reader, client_id: str | None = None) -> Response:
    """For reviewers (both readings, side by side) and the reading's own annotator."""
    client = who(client_id)
    team = _team()
    kept = team.double.reading(version)
    if kept is None:
        raise HTTPException(status_code=404, detail=f"no double reading version {version}")
    label, names, about = kept
    if about["client"] != client and not team.roles.reviewer(client):
        raise HTTPException(status_code=403, detail=f"reading {version} is {about['client']}'s: reviewers only")
    return Response(
        np.asarray(label, np.uint8).tobytes(order="F"),
        media_type="application/octet-stream",
        headers={
            "X-SegVol-Labels": json.dumps({str(k): v for k, v in sorted(names.items())}),
            "X-SegVol-Reading": json.dumps(about),
        },
    )


@app.get("/segvol/team", summary="The team's figures per annotator and per category (reviewers and admins)")
def team_figures_route(user: Reader, client_id: str | None = None, format: Literal["json", "csv"] = "json"):
    client = who(client_id)
    team = _team()
    if not team.roles.sees_figures(client):
        raise HTTPException(status_code=403, detail=f"{client} is not a reviewer or admin: the team figures are theirs")
    figures = team_figures(team.store, team.double.all_agreements())
    if format == "csv":
        return Response(
            as_csv(figures),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="segvol-team.csv"'},
        )
    return figures


@app.put("/datastore/updatelabelinfo", include_in_schema=False)
def update_label_info(
    label: str,
    tag: str,
    user: Reader,
    info: Annotated[str, Form()] = "{}",
    params: Annotated[str | None, Form()] = None,
) -> dict:
    """MONAI Label's older path for rewriting a label's info. 3D Slicer's reviewer module
    (MONAILabelReviewer) sends ``params`` = {"segmentationMeta": {status, approvedBy, level,
    comment, editTime}} on the image id and tag: here that is a review of the image's final label
    (``approved``: approve; ``flagged``: return with its comment; ``""``: nothing). Any other
    rewrite stays the admin's (lib/team/access.py)."""
    body = json_params(params if params is not None else info, "params")
    if set(body) != {"segmentationMeta"}:
        require("CHANGE_DATASTORE", user)
        return update_info(label, tag, body)
    return _slicer_review(known_image(label), tag, body["segmentationMeta"])


SLICER_STATUS = {"approved": "approve", "flagged": "return"}


def _slicer_review(image: str, tag: str, meta: object) -> dict:
    if not isinstance(meta, dict) or meta.get("status", "") not in ("", *SLICER_STATUS):
        raise HTTPException(status_code=400, detail='segmentationMeta.status must be "approved", "flagged" or ""')
    if tag != "final":
        raise HTTPException(status_code=400, detail=f"a review is of the image's final label, not of tag {tag!r}")
    # without sign-in the module names its reviewer in approvedBy (a name, not a proof, as client_id)
    client = who(usable_name(meta.get("approvedBy")) or None)
    team = _reviewer(client)
    newest = team.final_saves.newest(image, team.blind(image, client))
    if newest is None:
        raise HTTPException(status_code=404, detail=f"image {image!r} has no final label to review")
    action = SLICER_STATUS.get(meta.get("status", ""))
    try:
        if action is None:
            return {"segmentationMeta": team.reviews.slicer_meta(newest["version"])}
        comment = meta.get("comment") or ("" if action == "approve" else "flagged in 3D Slicer's reviewer")
        team.reviews.act(newest["version"], client, action, comment, None, team.roles.self_review)
    except ReviewError as e:
        raise _refused(e) from e
    return {"segmentationMeta": team.reviews.slicer_meta(newest["version"])}


ROUTES = (update_label_info, whoami, review_queue, review, review_returned, review_image, reading, team_figures_route)
