"""The HTTP API (FastAPI) and the web viewer for a loaded :class:`~radgrounder.inference.Predictor`.

``radgrounder serve --model M`` calls :func:`serve`; tests and other hosts call
:func:`create_app` with a predictor of their own.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from radgrounder import __version__
from radgrounder.chat_client import is_loopback
from radgrounder.errors import RadGrounderError
from radgrounder.imaging import WINDOWS, Volume, display_image, load_scan
from radgrounder.serve import params
from radgrounder.serve.batching import Batcher
from radgrounder.serve.middleware import RequestMiddleware
from radgrounder.serve.uploads import (
    UploadError,
    UploadForm,
    public_message,
    read_multipart,
    scan_path,
)

logger = logging.getLogger("radgrounder.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Largest volume decoded from an upload (float32 voxels; 2**29 is 2 GiB).
MAX_VOXELS = 2**29

_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "files": {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "DICOM files of one series, a zip of them, one NIfTI or one PNG/JPEG.",
    },
}
_SLICES_BODY = {
    "type": "object",
    "required": ["files"],
    "properties": {
        **_FORM_FIELDS,
        "window": {"type": "string", "default": params.DEFAULT_WINDOW, "enum": list(WINDOWS)},
    },
}
_PREDICT_BODY = {
    "type": "object",
    "required": ["files"],
    "properties": {
        **_FORM_FIELDS,
        "task": {"type": "string", "enum": list(params.KNOWN_TASKS)},
        "language": {"type": "string", "enum": ["en", "de"], "default": "en"},
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
    },
}


def _multipart(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


def _png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


def _check_volume_size(path: Path) -> None:
    """Refuse a NIfTI whose header promises more voxels than the server decodes."""
    if not path.name.endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as exc:
        raise UploadError(400, "cannot read the NIfTI header") from exc
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise UploadError(413, f"the volume has more than {MAX_VOXELS} voxels")


def _load(form: UploadForm, folder: Path, max_unpacked: int) -> tuple[Path, Volume]:
    """The uploaded scan as a Volume (runs in a worker thread)."""
    path = scan_path(form.files, folder, max_unpacked=max_unpacked)
    _check_volume_size(path)
    try:
        volume = load_scan(path)
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


def create_app(
    predictor: Any,
    *,
    token: str | None = None,
    max_upload_bytes: int = 512 * 1024**2,
    max_batch: int = 8,
    batch_window_s: float = 0.02,
) -> FastAPI:
    """The API and viewer for ``predictor`` (a :class:`~radgrounder.inference.Predictor` or an
    object with its ``variant``, ``tasks``, ``languages``, ``prepare`` and ``run``).

    With ``token`` set every endpoint but ``/v1/health`` and the viewer's own files needs
    ``Authorization: Bearer <token>``. Bodies over ``max_upload_bytes`` get 413. Prediction
    requests are batched: one worker thread gathers prepared items for up to
    ``batch_window_s`` seconds or ``max_batch`` items per ``predictor.run`` call.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes: must be positive, got {max_upload_bytes}")
    # A lambda, so a predictor whose ``run`` is replaced later (tests) is still honoured.
    batcher = Batcher(
        lambda items, **kw: predictor.run(items, **kw),
        max_batch=max_batch,
        window_s=batch_window_s,
    )
    max_unpacked = 4 * max_upload_bytes
    colors, display_names = _palette()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.stop)

    app = FastAPI(
        title="RadGrounder",
        version=__version__,
        description="Grounded radiology reports, VQA and structure localisation on CT/MR "
        "slices. The web viewer is at `/`.",
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.add_middleware(RequestMiddleware, token=token)

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @asynccontextmanager
    async def upload(request: Request) -> AsyncIterator[tuple[UploadForm, Path]]:
        """The request's files in a private temporary folder, removed when the block ends."""
        tmp = tempfile.TemporaryDirectory(prefix="radgrounder-upload-")
        try:
            folder = Path(tmp.name)
            os.chmod(folder, 0o700)
            form = await read_multipart(
                request.stream(),
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                folder,
                max_bytes=max_upload_bytes,
            )
            yield form, folder
        finally:
            await anyio.to_thread.run_sync(tmp.cleanup)

    def request_id(request: Request) -> str:
        return getattr(request.state, "request_id", None) or uuid.uuid4().hex[:16]

    @app.get("/v1/health", tags=["api"])
    async def health() -> dict[str, str]:
        """Liveness check (no token needed)."""
        return {"status": "ok"}

    @app.get("/v1/model", tags=["api"])
    async def model() -> dict[str, Any]:
        """The model's variant, tasks and languages, the display windows, and the class
        colours and display names the viewer uses."""
        return {
            "variant": predictor.variant,
            "tasks": list(predictor.tasks),
            "languages": list(predictor.languages),
            "windows": list(WINDOWS),
            "default_window": params.DEFAULT_WINDOW,
            "max_new_tokens": params.MAX_NEW_TOKENS,
            "colors": colors,
            "display_names": display_names,
        }

    @app.post("/v1/slices", tags=["api"], openapi_extra=_multipart(_SLICES_BODY))
    async def slices(request: Request) -> dict[str, Any]:
        """Every slice of the uploaded study as a PNG (base64) in the chosen window."""
        async with upload(request) as (form, folder):
            window = params.window(form.fields)
            _, volume = await anyio.to_thread.run_sync(_load, form, folder, max_unpacked)
            pngs = await anyio.to_thread.run_sync(_display, volume, window)
        height, width = volume.data.shape[1:3]
        return {
            "n_slices": volume.n_slices,
            "modality": volume.modality,
            "width": int(width),
            "height": int(height),
            "slices": pngs,
        }

    @app.post("/v1/predict", tags=["api"], openapi_extra=_multipart(_PREDICT_BODY))
    async def predict(request: Request) -> dict[str, Any]:
        """Run a task on one slice (default: the middle one) or all slices of the upload."""
        async with upload(request) as (form, folder):
            fields = params.predict_params(
                form.fields, predictor.tasks, predictor.languages, predictor.variant
            )
            path, volume = await anyio.to_thread.run_sync(_load, form, folder, max_unpacked)
            indices = params.slice_indices(fields.slice, volume.n_slices)
            images: list[Any] = (
                [path]
                if volume.kind == "image"
                else [replace(volume.slice(k), source="upload") for k in indices]
            )

            def prepare() -> list[Any]:
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
                    raise UploadError(422, public_message(exc, folder)) from exc
                except Exception as exc:
                    raise UploadError(400, "cannot preprocess the image") from exc

            items = await anyio.to_thread.run_sync(prepare)
        try:
            preds = await batcher.submit(items, fields.max_new_tokens)
        except Exception as exc:
            rid = request_id(request)
            logger.error("request_id=%s generation failed: %s", rid, type(exc).__name__)
            return JSONResponse(
                {"detail": f"generation failed (request id {rid})"},
                status_code=500,
            )
        body = await anyio.to_thread.run_sync(lambda: [_response_prediction(p) for p in preds])
        return {"request_id": request_id(request), "n_slices": volume.n_slices, "predictions": body}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(
    model_path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_mb: int = 512,
    device: str | None = None,
) -> None:
    """Load ``model_path`` and serve the API and viewer with uvicorn on ``host:port``."""
    import uvicorn

    from radgrounder.inference import Predictor

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    if max_upload_mb < 1:
        raise RadGrounderError(f"max_upload_mb: must be at least 1, got {max_upload_mb}")
    if not is_loopback(host) and not token:
        logger.warning(
            "serving on %s without a token: anyone who can reach this address can use the "
            "model; set --token (or RADGROUNDER_TOKEN)",
            host,
        )
    predictor = Predictor(model_path, device=device)
    app = create_app(predictor, token=token, max_upload_bytes=int(max_upload_mb) * 1024**2)
    # Our middleware logs every request with its id; uvicorn's access log would add client
    # addresses and query strings.
    uvicorn.run(app, host=host, port=port, access_log=False)
