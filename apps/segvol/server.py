"""The ASGI app: MONAI Label's, with errors a client causes answered as 4xx with a message.

Run through MONAI Label's launcher: ``--uvicorn_app server:app`` (apps/segvol on PYTHONPATH).
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException


@app.exception_handler(json.JSONDecodeError)
async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})


@app.exception_handler(MONAILabelException)
async def monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


__all__ = ["app"]
