"""Errors as JSON problem details (RFC 9457), naming the field or id at fault."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"

log = logging.getLogger(__name__)


class Problem(BaseModel):
    """RFC 9457 problem details, with the fields at fault in `errors`."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        None, description="For validation problems: each field's location and message."
    )


class ProblemError(Exception):
    """Raise in a handler to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, errors: list[dict] | None = None, **extra):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.extra = status, detail, errors, extra


def problem_response(
    request: Request, status: int, detail: str | None, errors=None, headers=None, **extra
) -> JSONResponse:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=str(request.url.path),
        errors=errors,
    ).model_dump(exclude_none=True)
    body.update(extra)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these status codes, each a problem document."""
    return {
        code: {
            "model": Problem,
            "content": {PROBLEM_JSON: {}},
            "description": HTTPStatus(code).phrase,
        }
        for code in codes
    }


# OpenAPI: every route may answer with these.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = problem_responses(401, 403, 404, 409, 413, 422)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(request, exc.status, exc.detail, exc.errors, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return problem_response(request, 422, f"invalid request: {where}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(request, exc.status_code, detail, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the server log has the details")
