"""The HTTP API (FastAPI) and the web viewer for a loaded :class:`~radgrounder.inference.Predictor`.

``radgrounder serve --model M`` calls :func:`serve`; tests and other hosts call
:func:`create_app` with a predictor of their own.
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from radgrounder import __version__
from radgrounder.chat_client import is_loopback
from radgrounder.errors import RadGrounderError
from radgrounder.imaging import WINDOWS, Volume, display_image, load_scan
from radgrounder.imaging.volume import VolumeTooLarge
from radgrounder.serve import params
from radgrounder.serve.batching import Batcher, DeadlineExceeded, QueueFull
from radgrounder.serve.limits import ServeLimits
from radgrounder.serve.middleware import LOOPBACK_HOSTS, RequestMiddleware
from radgrounder.serve.middleware import allowed_hosts as allowed_hosts_for
from radgrounder.serve.protocol import HeaderTimeoutH11Protocol
from radgrounder.serve.responses import error_responses
from radgrounder.serve.studies import Study, StudyStore
from radgrounder.serve.uploads import (
    UploadError,
    UploadForm,
    public_message,
    read_multipart,
    read_urlencoded,
    scan_path,
)

logger = logging.getLogger("radgrounder.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Largest volume decoded from an upload by default (float32 voxels; 2**29 is 2 GiB).
MAX_VOXELS = ServeLimits.max_voxels

_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "files": {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "description": "DICOM files of one series, a zip of them, one NIfTI or one PNG/JPEG.",
    },
}
_SLICES_BODY = {
    "type": "object",
    "required": ["files"],
    "properties": {
        **_FORM_FIELDS,
        "window": {
            "type": "string",
            "default": params.DEFAULT_WINDOW,
            "enum": ["", *WINDOWS],
            "description": "Empty: the default.",
        },
    },
}
_TASK_FIELDS: dict[str, Any] = {
    "task": {
        "type": "string",
        "enum": ["", *params.KNOWN_TASKS],
        "description": "Empty: grounded-report where the model has it.",
    },
    "language": {"type": "string", "enum": ["", "en", "de"], "default": "en"},
    "question": {"type": "string", "description": "The question (task vqa)."},
    "clinical_info": {"type": "string"},
    "clinical_question": {"type": "string"},
    "structures": {"type": "string", "description": "Comma-separated (detect/segment)."},
    "slice": {"type": "string", "description": "A slice number or 'all'; default: middle."},
    "max_new_tokens": {
        "type": "integer",
        "default": params.DEFAULT_MAX_NEW_TOKENS,
        "maximum": params.MAX_NEW_TOKENS,
    },
}
_PREDICT_BODY = {
    "type": "object",
    "required": ["files"],
    "properties": {**_FORM_FIELDS, **_TASK_FIELDS},
}
_STUDY_BODY = {"type": "object", "required": ["files"], "properties": _FORM_FIELDS}
_STUDY_PREDICT_BODY = {"type": "object", "properties": _TASK_FIELDS}


def _multipart(schema: dict[str, Any], max_new_tokens: int | None = None) -> dict[str, Any]:
    """The request body of a form route; ``max_new_tokens``: the server's limit."""
    if max_new_tokens is not None and "max_new_tokens" in schema["properties"]:
        field = {**schema["properties"]["max_new_tokens"], "maximum": max_new_tokens}
        field["default"] = min(field["default"], max_new_tokens)
        schema = {**schema, "properties": {**schema["properties"], "max_new_tokens": field}}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _png_base64(image: np.ndarray) -> str:
    return base64.b64encode(_png(image)).decode("ascii")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _palette() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Class colours (as in :func:`radgrounder.visualize.class_color`) and display names."""
    from radgrounder.anatomy import LANGUAGES, load_schema
    from radgrounder.visualize import class_color

    schema = load_schema()
    colors = {str(i): _hex(class_color(i)) for i in schema.ids}
    colors["null"] = _hex(class_color(None))
    names = {lang: {str(k): v for k, v in schema.display_names(lang).items()} for lang in LANGUAGES}
    return colors, names


def _load(form: UploadForm, folder: Path, limits: ServeLimits) -> tuple[Path, Volume]:
    """The uploaded scan as a Volume (runs in a worker thread); headers are checked against
    the voxel cap before any pixel is decoded."""
    path = scan_path(
        form.files, folder, max_unpacked=limits.max_unpacked_bytes, max_voxels=limits.max_voxels
    )
    try:
        volume = load_scan(path, max_voxels=limits.max_voxels)
    except VolumeTooLarge as exc:
        raise UploadError(413, public_message(exc, folder)) from exc
    except RadGrounderError as exc:
        raise UploadError(400, f"cannot read the scan: {public_message(exc, folder)}") from exc
    except Exception as exc:  # a reader library failing on garbage
        raise UploadError(400, "cannot read the scan: the file is damaged or unsupported") from exc
    return path, volume


def _display(volume: Volume, window: str) -> list[dict[str, Any]]:
    return [
        {
            "index": k,
            "png": _png_base64(display_image(volume.data[k], volume.modality, preset=window)),
        }
        for k in range(volume.n_slices)
    ]


def _response_prediction(pred: Any) -> dict[str, Any]:
    """``pred.to_dict()`` without server paths, with each span's mask as a base64 PNG."""
    out = pred.to_dict()
    out["input"] = "upload"
    for span, entry in zip(pred.grounded.spans, out["spans"], strict=True):
        if span.mask is not None:
            entry["mask_png"] = _png_base64(np.asarray(span.mask, bool).astype(np.uint8) * 255)
    return out


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (or any keyword)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _retry_response(exc: QueueFull, what: str) -> JSONResponse:
    return JSONResponse(
        {"detail": f"server busy: {what}; retry in {exc.retry_after} s"},
        status_code=503,
        headers={"Retry-After": str(exc.retry_after)},
    )


def create_app(
    predictor: Any,
    *,
    token: str | None = None,
    limits: ServeLimits | None = None,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    **overrides: Any,
) -> FastAPI:
    """The API and viewer for ``predictor`` (a :class:`~radgrounder.inference.Predictor` or an
    object with its ``variant``, ``tasks``, ``languages``, ``prepare`` and ``run``).

    ``limits`` (a :class:`ServeLimits`; keyword ``overrides`` such as ``max_upload_bytes=``
    replace single fields) bound what a request and all requests together may cost; the
    prompt budget is the predictor's own ``max_prompt_tokens`` (:func:`serve` builds the
    predictor with ``limits.max_prompt_tokens``).
    ``allowed_hosts`` are the Host header names answered (default: loopback names; None or
    ``"*"``: any). With ``token`` set every endpoint but ``/v1/health``, the API description
    and the viewer's own files needs ``Authorization: Bearer <token>``. Prediction requests
    are batched by one worker thread (see :class:`~radgrounder.serve.batching.Batcher`).
    """
    limits = replace(limits or ServeLimits(), **overrides)
    # A lambda, so a predictor whose ``run`` is replaced later (tests) is still honoured.
    batcher = Batcher(
        lambda items, **kw: predictor.run(items, **kw),
        max_batch=limits.max_batch,
        window_s=limits.batch_window_s,
        max_queued=limits.max_queued_items,
        pass_should_stop=_accepts(predictor.run, "should_stop"),
    )
    store = StudyStore(max_bytes=limits.study_storage_bytes, ttl_s=limits.study_ttl_s)
    colors, display_names = _palette()
    uploads_in_flight = 0

    async def expire_studies() -> None:
        while True:
            await anyio.sleep(min(60.0, limits.study_ttl_s / 2))
            await anyio.to_thread.run_sync(store.expire)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(expire_studies)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(batcher.stop)
            await anyio.to_thread.run_sync(store.close)

    app = FastAPI(
        title="RadGrounder",
        version=__version__,
        description="Grounded radiology reports, VQA and structure localisation on CT/MR "
        "slices. The web viewer is at `/`. With a token configured, press *Authorize* and "
        "enter it.",
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.state.studies = store
    app.state.limits = limits
    app.add_middleware(RequestMiddleware, token=token, hosts=allowed_hosts)
    bearer = HTTPBearer(auto_error=False, description="The server's token (--token-file).")
    auth = [Depends(bearer)] if token else []

    def errors(method: str, path: str, ok: dict[str, Any] | None = None) -> dict[int | str, Any]:
        out = error_responses(method, path, token=token is not None)
        return {200: ok, **out} if ok else out

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One line, like every other error (FastAPI's default is a list of objects).
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("path", "query"))
        return JSONResponse(
            {"detail": f"{where or 'request'}: {first.get('msg', 'invalid value')}"},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path has, not only one route's
            allowed = set()
            for route in app.routes:
                methods = getattr(route, "methods", None)
                if methods and route.matches(request.scope)[0] != Match.NONE:
                    allowed |= methods
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _retry_response(exc, "the model queue is full")

    @asynccontextmanager
    async def upload(request: Request) -> AsyncIterator[tuple[UploadForm, Path]]:
        """The request's files in a private temporary folder, removed when the block ends.
        At most ``max_concurrent_uploads`` bodies are received at once (503 beyond)."""
        nonlocal uploads_in_flight
        if uploads_in_flight >= limits.max_concurrent_uploads:
            raise UploadError503(limits.max_concurrent_uploads)
        uploads_in_flight += 1
        tmp = tempfile.TemporaryDirectory(prefix="radgrounder-upload-")
        try:
            folder = Path(tmp.name)
            os.chmod(folder, 0o700)
            form = await read_multipart(
                request.stream(),
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                folder,
                max_bytes=limits.max_upload_bytes,
                idle_timeout_s=limits.upload_idle_timeout_s,
                timeout_s=limits.upload_timeout_s,
            )
            yield form, folder
        finally:
            uploads_in_flight -= 1
            await anyio.to_thread.run_sync(tmp.cleanup)

    async def form_only(request: Request) -> dict[str, str]:
        """The text fields of a request that carries no files (multipart or urlencoded)."""
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind == "application/x-www-form-urlencoded":
            return await read_urlencoded(
                request.stream(),
                request.headers.get("content-length"),
                idle_timeout_s=limits.upload_idle_timeout_s,
                timeout_s=limits.upload_timeout_s,
            )
        async with upload(request) as (form, _):
            if form.files:
                raise UploadError(400, "this endpoint takes no files: the study is stored")
            return form.fields

    def request_id(request: Request) -> str:
        return getattr(request.state, "request_id", None) or uuid.uuid4().hex[:16]

    def checked_params(fields: dict[str, str]) -> params.PredictParams:
        """Validated form fields, with the prompts checked before any image is decoded."""
        p = params.predict_params(
            fields,
            predictor.tasks,
            predictor.languages,
            predictor.variant,
            max_new_tokens=limits.max_new_tokens,
        )
        check = getattr(predictor, "prompts", None)
        if check is not None:
            try:
                check(
                    p.task,
                    p.language,
                    question=p.question,
                    clinical_info=p.clinical_info,
                    clinical_question=p.clinical_question,
                    structures=p.structures,
                )
            except RadGrounderError as exc:
                raise UploadError(422, str(exc)) from exc
        return p

    def prepare(images: list[Any], fields: params.PredictParams, folder: Path | None) -> list[Any]:
        try:
            return predictor.prepare(
                images,
                fields.task,
                language=fields.language,
                question=fields.question,
                clinical_info=fields.clinical_info,
                clinical_question=fields.clinical_question,
                structures=fields.structures,
            )
        except RadGrounderError as exc:
            raise UploadError(422, public_message(exc, folder) if folder else str(exc)) from exc
        except FileNotFoundError as exc:
            raise UploadError(404, "the study was deleted while the request ran") from exc
        except Exception as exc:
            raise UploadError(400, "cannot preprocess the image") from exc

    async def generate(request: Request, items: list[Any], max_new_tokens: int) -> Any:
        """Run ``items`` through the batcher; cancelled when the client disconnects.
        Returns the predictions or a JSONResponse for queue/deadline/generation failures."""
        result: dict[str, Any] = {}

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    result["gone"] = True
                    scope.cancel()
                    return

        async def work(scope: anyio.CancelScope) -> None:
            try:
                result["preds"] = await batcher.submit(
                    items, max_new_tokens, timeout_s=limits.request_timeout_s
                )
            except Exception as exc:
                result["error"] = exc
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, tg.cancel_scope)
            tg.start_soon(work, tg.cancel_scope)
        rid = request_id(request)
        if "preds" in result:
            return result["preds"]
        error = result.get("error")
        if isinstance(error, QueueFull):
            return _retry_response(error, "the model queue is full")
        if isinstance(error, DeadlineExceeded):
            return JSONResponse(
                {
                    "detail": f"not answered within {limits.request_timeout_s:g} s "
                    f"(request id {rid}); send fewer slices or retry later"
                },
                status_code=504,
            )
        if result.get("gone"):
            logger.info("request_id=%s client disconnected; its work was cancelled", rid)
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        logger.error("request_id=%s generation failed: %s", rid, type(error).__name__)
        return JSONResponse({"detail": f"generation failed (request id {rid})"}, status_code=500)

    async def answer(request: Request, preds: Any, n_slices: int) -> Any:
        if isinstance(preds, JSONResponse):
            return preds
        body = await anyio.to_thread.run_sync(lambda: [_response_prediction(p) for p in preds])
        return {"request_id": request_id(request), "n_slices": n_slices, "predictions": body}

    def study_meta(study: Study) -> dict[str, Any]:
        return {**study.meta, "expires_in_s": store.expires_in(study)}

    @app.get("/v1/health", tags=["api"], responses=errors("GET", "/v1/health"))
    async def health() -> dict[str, str]:
        """Liveness check (no token needed)."""
        return {"status": "ok"}

    @app.get("/v1/model", tags=["api"], dependencies=auth, responses=errors("GET", "/v1/model"))
    async def model() -> dict[str, Any]:
        """The model's variant, tasks and languages, the display windows, the limits a
        client should respect, and the class colours and display names the viewer uses."""
        return {
            "variant": predictor.variant,
            "tasks": list(predictor.tasks),
            "languages": list(predictor.languages),
            "windows": list(params.VIEWING_WINDOWS),
            "window_values": {
                name: {"center": WINDOWS[name][1], "width": WINDOWS[name][0]}
                for name in params.VIEWING_WINDOWS
            },
            "default_window": params.DEFAULT_WINDOW,
            "max_new_tokens": limits.max_new_tokens,
            "max_prompt_tokens": getattr(predictor, "max_prompt_tokens", None),
            "max_upload_bytes": limits.max_upload_bytes,
            "colors": colors,
            "display_names": display_names,
        }

    @app.post(
        "/v1/slices",
        tags=["api"],
        openapi_extra=_multipart(_SLICES_BODY),
        dependencies=auth,
        responses=errors("POST", "/v1/slices"),
    )
    async def slices(request: Request) -> dict[str, Any]:
        """Every slice of the uploaded study as a PNG (base64) in the chosen window
        (one-shot; a viewer stores the study with ``POST /v1/studies`` instead)."""
        async with upload(request) as (form, folder):
            window = params.window(form.fields)
            _, volume = await anyio.to_thread.run_sync(_load, form, folder, limits)
            pngs = await anyio.to_thread.run_sync(_display, volume, window)
        height, width = volume.data.shape[1:3]
        return {
            "n_slices": volume.n_slices,
            "modality": volume.modality,
            "width": int(width),
            "height": int(height),
            "slices": pngs,
        }

    @app.post(
        "/v1/predict",
        tags=["api"],
        openapi_extra=_multipart(_PREDICT_BODY, limits.max_new_tokens),
        dependencies=auth,
        responses=errors("POST", "/v1/predict"),
    )
    async def predict(request: Request) -> Any:
        """Run a task on one slice (default: the middle one) or all slices of the upload
        (one-shot: the study is uploaded, decoded and discarded with the request)."""
        batcher.check_admission()
        async with upload(request) as (form, folder):
            fields = await anyio.to_thread.run_sync(checked_params, form.fields)
            path, volume = await anyio.to_thread.run_sync(_load, form, folder, limits)
            indices = params.slice_indices(fields.slice, volume.n_slices)
            images: list[Any] = (
                [path]
                if volume.kind == "image"
                else [replace(volume.slice(k), source="upload") for k in indices]
            )
            items = await anyio.to_thread.run_sync(prepare, images, fields, folder)
        preds = await generate(request, items, fields.max_new_tokens)
        return await answer(request, preds, volume.n_slices)

    @app.post(
        "/v1/studies",
        tags=["studies"],
        status_code=201,
        openapi_extra=_multipart(_STUDY_BODY),
        dependencies=auth,
        responses=errors("POST", "/v1/studies"),
    )
    async def create_study(request: Request) -> dict[str, Any]:
        """Upload a study once; later requests refer to it by ``study_id``. It is private
        to this server, expires after ``expires_in_s`` without use and is deleted then."""
        async with upload(request) as (form, folder):
            path, volume = await anyio.to_thread.run_sync(_load, form, folder, limits)
            photo = path if volume.kind == "image" and volume.modality is None else None
            study = await anyio.to_thread.run_sync(store.add, volume, photo)
        return study_meta(study)

    @app.get(
        "/v1/studies/{study_id}",
        tags=["studies"],
        dependencies=auth,
        responses=errors("GET", "/v1/studies/{study_id}"),
    )
    async def get_study(study_id: str) -> dict[str, Any]:
        """A stored study's metadata (geometry, windows, expiry)."""
        return study_meta(store.get(study_id))

    @app.delete(
        "/v1/studies/{study_id}",
        tags=["studies"],
        status_code=204,
        dependencies=auth,
        responses=errors("DELETE", "/v1/studies/{study_id}"),
    )
    async def delete_study(study_id: str) -> Response:
        """Delete a stored study now."""
        await anyio.to_thread.run_sync(store.delete, study_id)
        return Response(status_code=204)

    @app.get(
        "/v1/studies/{study_id}/slices/{index}/pixels",
        tags=["studies"],
        dependencies=auth,
        response_class=Response,
        responses=errors(
            "GET",
            "/v1/studies/{study_id}/slices/{index}/pixels",
            {"content": {"application/octet-stream": {}}},
        ),
    )
    async def slice_pixels(study_id: str, index: int) -> Response:
        """Slice ``index``'s raw values, little-endian, rows x columns (x channels), in the
        study's ``pixel_dtype`` (HU for CT), for windowing in the client."""
        study = store.get(study_id)
        k = params.slice_indices(index, study.meta["n_slices"])[0]
        pixels = await anyio.to_thread.run_sync(study.pixels, k)
        dtype = study.meta["pixel_dtype"]
        return Response(
            pixels.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes(),
            media_type="application/octet-stream",
            headers={
                "X-Rows": str(pixels.shape[0]),
                "X-Columns": str(pixels.shape[1]),
                "X-Channels": str(study.meta["channels"]),
                "X-Pixel-Dtype": dtype,
            },
        )

    @app.get(
        "/v1/studies/{study_id}/slices/{index}/image",
        tags=["studies"],
        dependencies=auth,
        response_class=Response,
        responses=errors(
            "GET",
            "/v1/studies/{study_id}/slices/{index}/image",
            {"content": {"image/png": {}}},
        ),
    )
    async def slice_image(study_id: str, index: int, window: str | None = None) -> Response:
        """Slice ``index`` as a PNG in a display window (default: the study's)."""
        study = store.get(study_id)
        k = params.slice_indices(index, study.meta["n_slices"])[0]
        name = params.window({"window": window} if window else {})

        def render() -> bytes:
            return _png(display_image(study.volume.data[k], study.volume.modality, preset=name))

        return Response(await anyio.to_thread.run_sync(render), media_type="image/png")

    @app.post(
        "/v1/studies/{study_id}/predict",
        tags=["studies"],
        openapi_extra=_multipart(_STUDY_PREDICT_BODY, limits.max_new_tokens),
        dependencies=auth,
        responses=errors("POST", "/v1/studies/{study_id}/predict"),
    )
    async def predict_study(study_id: str, request: Request) -> Any:
        """Run a task on slices of a stored study; only those slices are read."""
        study = store.get(study_id)
        batcher.check_admission()
        form_fields = await form_only(request)
        fields = await anyio.to_thread.run_sync(checked_params, form_fields)
        n = study.meta["n_slices"]
        indices = params.slice_indices(fields.slice, n)
        images: list[Any] = (
            [study.image_path]
            if study.image_path is not None
            else [replace(study.volume.slice(k), source="upload") for k in indices]
        )
        items = await anyio.to_thread.run_sync(prepare, images, fields, None)
        preds = await generate(request, items, fields.max_new_tokens)
        return await answer(request, preds, n)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class UploadError503(UploadError):
    """Too many uploads at once."""

    def __init__(self, limit: int) -> None:
        super().__init__(503, f"server busy: {limit} uploads are being received; retry shortly")


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (its first line). Refused when others can read the file."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RadGrounderError(f"cannot read the token file: {exc.strerror}", path=file) from exc
    if mode & 0o077:
        raise RadGrounderError(
            f"the token file is readable by others (mode {mode & 0o777:o}); chmod 600 it",
            path=file,
        )
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise RadGrounderError(
            "the token file must hold a token of at least 16 characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            path=file,
        )
    return token


def uvicorn_config(app: Any, limits: ServeLimits, **options: Any) -> Any:
    """The ``uvicorn.Config`` :func:`serve` runs ``app`` with: the header timeout, keep-alive
    timeout and connection limit of ``limits``, a 16 KiB cap on incomplete request heads, no
    access log (the middleware logs every request with its id; uvicorn's log would add client
    addresses and query strings). ``options``: host, port, log_level, ..."""
    import uvicorn

    return uvicorn.Config(
        app,
        access_log=False,
        http=HeaderTimeoutH11Protocol.with_timeout(limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_timeout_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=16 * 1024,
        timeout_graceful_shutdown=10,
        **options,
    )


def serve(
    model_path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_mb: int = 512,
    device: str | None = None,
    *,
    limits: ServeLimits | None = None,
    allowed_hosts: Iterable[str] = (),
    insecure_no_token: bool = False,
) -> None:
    """Load ``model_path`` and serve the API and viewer with uvicorn on ``host:port``.

    Binding an address other than loopback without ``token`` is refused unless
    ``insecure_no_token``."""
    import uvicorn

    from radgrounder.inference import Predictor

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    if max_upload_mb < 1:
        raise RadGrounderError(f"max_upload_mb: must be at least 1, got {max_upload_mb}")
    limits = replace(limits or ServeLimits(), max_upload_bytes=int(max_upload_mb) * 1024**2)
    if not is_loopback(host) and not token:
        if not insecure_no_token:
            raise RadGrounderError(
                f"refusing to serve on {host} without a token: anyone who can reach it could "
                "use the model. Set RADGROUNDER_TOKEN or --token-file, or pass "
                "--insecure-no-token if the network is yours alone"
            )
        logger.warning("serving on %s WITHOUT a token (--insecure-no-token)", host)
    predictor = Predictor(model_path, device=device, max_prompt_tokens=limits.max_prompt_tokens)
    hosts = allowed_hosts_for(host, allowed_hosts)
    app = create_app(predictor, token=token, limits=limits, allowed_hosts=hosts)
    config = uvicorn_config(app, limits, host=host, port=port)
    logger.info(
        "serving %s on http://%s:%d/ (hosts: %s)",
        predictor.variant,
        host if ":" not in host else f"[{host}]",
        port,
        ", ".join(hosts),
    )
    uvicorn.Server(config).run()
