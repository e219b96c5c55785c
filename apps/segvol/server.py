"""The ASGI app: MONAI Label's, with errors a client causes answered as 4xx with a message.

Run through MONAI Label's launcher: ``--uvicorn_app server:app`` (apps/segvol on PYTHONPATH).
"""

from __future__ import annotations

import json
from pathlib import Path

import monailabel
from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from monailabel.app import app
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException


@app.exception_handler(json.JSONDecodeError)
async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})


# MONAI Label answers these client mistakes with HTTP 500
CLIENT_MISTAKES = ("Neither Image nor File", "DICOM SEG format is not supported in a non-DICOM datastore")


@app.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 500 and str(exc.detail).startswith(CLIENT_MISTAKES):
        exc = HTTPException(status_code=400, detail=f"{exc.detail} (give ?image=<an id from /datastore/>)")
    return await http_exception_handler(request, exc)


@app.exception_handler(MONAILabelException)
async def monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


OHIF_CONFIG = Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif" / "app-config.js"
SAVE_BUTTON = Path(__file__).parent / "static" / "save-label.js"


@app.get("/ohif/app-config.js", include_in_schema=False)
def ohif_config() -> Response:
    """OHIF's configuration, plus the script that adds a "Save label" button to the monai-label mode."""
    return Response(OHIF_CONFIG.read_text() + "\n" + SAVE_BUTTON.read_text(), media_type="application/javascript")


app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's catch-all /ohif/{path}

__all__ = ["app"]
