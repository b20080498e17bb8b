"""Uploaded studies: streaming multipart parsing into a private folder, safe zip extraction,
and the one path :func:`radgrounder.imaging.load_scan` reads.

Client file names are never used: every file is stored under a generated name whose suffix
comes from its content (DICOM, NIfTI, PNG/JPEG, zip), so nothing a client names can reach the
file system, the logs or an error message.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import parse_qsl

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header

FILES_FIELD = "files"
MAX_FILES = 5000
MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
MAX_ZIP_MEMBERS = 5000
_FLUSH_BYTES = 1024 * 1024
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")
_IMAGE_SUFFIX = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif"}
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


class UploadError(Exception):
    """A request the server refuses: an HTTP status and a message safe to show the client."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass
class UploadForm:
    """The parsed request: text fields by name and the stored files in upload order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def public_message(exc: BaseException, folder: Path) -> str:
    """``exc``'s message without the server's paths or DICOM UIDs, for the client."""
    text = str(exc)
    path = getattr(exc, "path", None)
    if path and text.startswith(f"{path}: "):
        text = text[len(path) + 2 :]
    text = text.replace(str(folder), "upload")
    return _UID.sub("<uid>", text)


def sniff(path: Path) -> str:
    """What a stored file holds, from its first bytes: ``dicom``, ``nifti``, ``nifti-gz``,
    ``zip``, ``png``, ``jpeg``, ``bmp``, ``tiff``, ``gzip`` or ``unknown``."""
    with path.open("rb") as fh:
        head = fh.read(352)
    kind = sniff_bytes(head)
    if kind == "gzip":
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(352)
        except (OSError, EOFError):
            return "gzip"
        return "nifti-gz" if _is_nifti_header(inner) else "gzip"
    return kind


def _gunzip_head(head: bytes, n: int = 352) -> bytes:
    """The first ``n`` decompressed bytes of the gzip stream that starts ``head``."""
    try:
        return zlib.decompressobj(wbits=31).decompress(head, n)
    except zlib.error:
        return b""


def sniff_bytes(head: bytes) -> str:
    """:func:`sniff` on a file's first bytes (a gzip stream is looked into)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if _is_nifti_header(head):
        return "nifti"
    if head[:2] == b"\x1f\x8b":
        inner = _gunzip_head(head)
        if not inner:
            return "gzip"
        return "nifti-gz" if _is_nifti_header(inner) else "gzip"
    return "unknown"


def _is_nifti_header(head: bytes) -> bool:
    return (len(head) >= 348 and head[344:348] in _NIFTI_MAGIC) or (
        len(head) >= 8 and head[4:8] in _NIFTI_MAGIC
    )


def _suffixed(path: Path) -> tuple[Path, str]:
    """Rename ``path`` to the suffix its content calls for; return the new path and kind."""
    kind = sniff(path)
    suffix = {"dicom": ".dcm", "nifti": ".nii", "nifti-gz": ".nii.gz", "zip": ".zip"}.get(
        kind, _IMAGE_SUFFIX.get(kind, ".bin")
    )
    target = path.with_name(path.name.split(".")[0] + suffix)
    path.rename(target)
    return target, kind


async def read_multipart(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    content_length: str | None,
    folder: Path,
    *,
    max_bytes: int,
    idle_timeout_s: float | None = None,
    timeout_s: float | None = None,
) -> UploadForm:
    """Stream a ``multipart/form-data`` body into ``folder``: files of the ``files`` field
    are written to disk as they arrive, text fields are kept (up to 64, each up to 64 KiB).
    The body is refused with 413 as soon as it is known to exceed ``max_bytes``
    (Content-Length first, then the bytes actually received), and with 408 when no bytes
    arrive for ``idle_timeout_s`` or the whole body takes longer than ``timeout_s``."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(
            415, "expected a multipart/form-data body with the scan under the field 'files'"
        )
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, "invalid Content-Length header") from None
        if declared > max_bytes:
            raise UploadError(413, _too_large(max_bytes))
    state = _PartState(folder)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": state.begin,
            "on_header_field": state.header_field,
            "on_header_value": state.header_value,
            "on_header_end": state.header_end,
            "on_headers_finished": state.headers_finished,
            "on_part_data": state.data,
            "on_part_end": state.end,
        },
    )
    received = 0
    try:
        async for chunk in _timed(chunks, idle_timeout_s, timeout_s):
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, _too_large(max_bytes))
            parser.write(chunk)
            if state.pending_bytes >= _FLUSH_BYTES:
                await anyio.to_thread.run_sync(state.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(state.flush)
    except UploadError:
        raise
    except Exception as exc:  # python-multipart's parse errors, a decode error, ...
        raise UploadError(400, "malformed multipart/form-data body") from exc
    finally:
        state.close()
    files = []
    for path in state.files:
        files.append(await anyio.to_thread.run_sync(_suffixed, path))
    return UploadForm(state.fields, [p for p, _ in files])


async def read_urlencoded(
    chunks: AsyncIterator[bytes],
    content_length: str | None,
    *,
    idle_timeout_s: float | None = None,
    timeout_s: float | None = None,
) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (at most 64 fields of
    64 KiB each; 413 beyond, 408 for a slow body)."""
    limit = MAX_FIELDS * (MAX_FIELD_BYTES + 64)
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise UploadError(413, f"form too large: at most {MAX_FIELDS} fields of 64 KiB")
    body = bytearray()
    async for chunk in _timed(chunks, idle_timeout_s, timeout_s):
        body += chunk
        if len(body) > limit:
            raise UploadError(413, f"form too large: at most {MAX_FIELDS} fields of 64 KiB")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise UploadError(400, "the form is not UTF-8 text") from None
    if len(pairs) > MAX_FIELDS:
        raise UploadError(413, f"too many form fields: at most {MAX_FIELDS}")
    fields: dict[str, str] = {}
    for name, value in pairs:
        if len(value.encode()) > MAX_FIELD_BYTES:
            raise UploadError(413, f"form field '{name[:40]}' is longer than 64 KiB")
        if name in fields:
            raise UploadError(422, f"form field '{name[:40]}' is given more than once")
        fields[name] = value
    return fields


async def _timed(
    chunks: AsyncIterator[bytes], idle_timeout_s: float | None, timeout_s: float | None
) -> AsyncIterator[bytes]:
    """``chunks``, or 408 when none arrives for ``idle_timeout_s`` or all take ``timeout_s``."""
    started = time.monotonic()
    iterator = chunks.__aiter__()
    while True:
        wait = idle_timeout_s
        if timeout_s is not None:
            left = timeout_s - (time.monotonic() - started)
            wait = left if wait is None else min(wait, left)
        try:
            with anyio.fail_after(None if wait is None else max(wait, 0.0)):
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadError(408, _slow_upload(idle_timeout_s, timeout_s)) from None
        yield chunk


def _slow_upload(idle_timeout_s: float | None, timeout_s: float | None) -> str:
    parts = []
    if idle_timeout_s is not None:
        parts.append(f"nothing for {idle_timeout_s:g} s")
    if timeout_s is not None:
        parts.append(f"more than {timeout_s:g} s in all")
    return f"upload too slow: the body must arrive without pauses ({' or '.join(parts)})"


def _too_large(max_bytes: int) -> str:
    return f"upload too large: the limit is {max_bytes / 1024**2:.0f} MiB ({max_bytes} bytes)"


class _PartState:
    """Callbacks for python-multipart's streaming parser."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fields: dict[str, str] = {}
        self.files: list[Path] = []
        self.pending: list[tuple[BinaryIO, bytes]] = []
        self.pending_bytes = 0
        self._handles: list[BinaryIO] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._file: BinaryIO | None = None
        self._buffer = bytearray()

    def begin(self) -> None:
        self._disposition, self._file, self._buffer = b"", None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadError(400, "a multipart part has no field name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._name != FILES_FIELD:
                raise UploadError(400, f"files must be sent under the field '{FILES_FIELD}'")
            if len(self.files) >= MAX_FILES:
                raise UploadError(413, f"too many files: at most {MAX_FILES} per request")
            path = self.folder / f"upload-{len(self.files):05d}"
            self.files.append(path)
            self._file = path.open("wb")
            self._handles.append(self._file)
        elif len(self.fields) >= MAX_FIELDS:
            raise UploadError(413, f"too many form fields: at most {MAX_FIELDS}")

    def data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._file is not None:
            self.pending.append((self._file, piece))
            self.pending_bytes += len(piece)
            return
        if len(self._buffer) + len(piece) > MAX_FIELD_BYTES:
            raise UploadError(413, f"form field '{self._name}' is longer than 64 KiB")
        self._buffer += piece

    def end(self) -> None:
        if self._file is None:
            if self._name in self.fields:
                raise UploadError(422, f"form field '{self._name[:40]}' is given more than once")
            try:
                self.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(400, f"form field '{self._name}' is not UTF-8 text") from None

    def flush(self) -> None:
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for handle, piece in pending:
            handle.write(piece)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()


def scan_path(
    files: list[Path], folder: Path, *, max_unpacked: int, max_voxels: int | None = None
) -> Path:
    """The path to load for the uploaded ``files`` (stored by :func:`read_multipart`): one
    NIfTI/image/DICOM file, a folder of one DICOM series, or what a zip holds."""
    if not files:
        raise UploadError(400, f"no file uploaded: send the scan under the field '{FILES_FIELD}'")
    kinds = [_kind(p) for p in files]
    if len(files) == 1:
        if kinds[0] == "zip":
            return _from_zip(files[0], folder, max_unpacked=max_unpacked, max_voxels=max_voxels)
        if kinds[0] in ("unknown", "gzip"):
            raise UploadError(415, _UNSUPPORTED)
        return files[0]
    if any(k not in ("dicom", "unknown") for k in kinds):
        raise UploadError(
            400,
            "several files were uploaded: send the DICOM files of one series, or a single "
            "zip, NIfTI or image file",
        )
    if "dicom" not in kinds:
        raise UploadError(415, _UNSUPPORTED)
    series = folder / "series"
    series.mkdir()
    for path in files:
        path.rename(series / path.name)
    return series


_UNSUPPORTED = (
    "unsupported upload: expected DICOM files of one series, a zip of them, one NIfTI "
    "(.nii/.nii.gz) or one PNG/JPEG image"
)


def _kind(path: Path) -> str:
    name = path.name
    for suffix, kind in (
        (".nii.gz", "nifti"),
        (".nii", "nifti"),
        (".dcm", "dicom"),
        (".zip", "zip"),
        (".png", "image"),
        (".jpg", "image"),
        (".bmp", "image"),
        (".tif", "image"),
    ):
        if name.endswith(suffix):
            return kind
    return "unknown"


def _safe_member(name: str) -> bool:
    if not name or "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


_HEAD_BYTES = 64 * 1024


def _header_voxels(kind: str, head: bytes, size: int) -> int:
    """Voxels a scan file promises, from its first bytes (before its pixels are written)."""
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
            dims = [ds.get(t, 1) or 1 for t in ("NumberOfFrames", "Rows", "Columns")]
            n = int(dims[0]) * int(dims[1]) * int(dims[2]) * int(ds.get("SamplesPerPixel", 1) or 1)
            return n if n > 0 else size // 2
        except Exception:  # a header longer than the head, or garbage: assume 16-bit pixels
            return size // 2
    if kind in ("nifti", "nifti-gz"):
        header = _gunzip_head(head, 540) if kind == "nifti-gz" else head[:540]
        return _nifti_voxels(header) or size
    return size // 3  # a raster image: at least one byte per channel of RGB


def _nifti_voxels(header: bytes) -> int | None:
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dim = struct.unpack(endian + "8q", header[16:80])
        else:
            continue
        n = 1
        for d in dim[1 : 1 + max(1, min(int(dim[0]), 7))]:
            n *= max(int(d), 1)
        return n
    return None


def _from_zip(
    archive: Path, folder: Path, *, max_unpacked: int, max_voxels: int | None = None
) -> Path:
    """Extract ``archive`` flat under generated names; refuse unsafe paths and zip bombs.

    Each member's kind is read from its first bytes and members that are no scan are never
    written; the voxels the scan members' headers promise are added up and the archive is
    refused (413) past ``max_voxels`` before their pixels reach the disk."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(400, "the zip file is damaged or not a zip file") from exc
    out = folder / "unzipped"
    out.mkdir()
    with zf:
        members = zf.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise UploadError(413, f"the zip holds more than {MAX_ZIP_MEMBERS} entries")
        if not all(_safe_member(m.filename) for m in members):
            raise UploadError(400, "the zip holds an entry with an absolute or '..' path")
        if sum(m.file_size for m in members) > max_unpacked:
            raise UploadError(413, _unpacked_too_large(max_unpacked))
        try:
            heads = _member_heads(zf, [m for m in members if not m.is_dir()])
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError) as exc:
            raise UploadError(400, "a zip entry cannot be extracted") from exc
        scans = [(m, head, kind) for m, head, kind in heads if kind in _SCAN_KINDS]
        if max_voxels is not None:
            voxels = sum(_header_voxels(kind, head, m.file_size) for m, head, kind in scans)
            if voxels > max_voxels:
                raise UploadError(
                    413, f"the zip's scans have {voxels} voxels; at most {max_voxels} are decoded"
                )
        total = 0
        extracted: list[Path] = []
        for n, (member, _, _) in enumerate(scans):
            target = out / f"member-{n:05d}"
            try:
                with zf.open(member) as src, target.open("wb") as dst:
                    while block := src.read(1024 * 1024):
                        total += len(block)
                        if total > max_unpacked:
                            raise UploadError(413, _unpacked_too_large(max_unpacked))
                        dst.write(block)
            except UploadError:
                raise
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError) as exc:
                # CRC errors, encrypted members, unsupported compression, truncation.
                raise UploadError(400, "a zip entry cannot be extracted") from exc
            extracted.append(_suffixed(target)[0])
    kinds = [_kind(p) for p in extracted]
    dicoms = [p for p, k in zip(extracted, kinds, strict=True) if k == "dicom"]
    singles = [p for p, k in zip(extracted, kinds, strict=True) if k in ("nifti", "image")]
    if dicoms and not singles:
        return out
    if len(singles) == 1 and not dicoms:
        return singles[0]
    if not dicoms and not singles:
        raise UploadError(415, "the zip holds no DICOM, NIfTI or image file")
    raise UploadError(
        400, "the zip must hold the DICOM files of one series, or a single NIfTI or image"
    )


_SCAN_KINDS = ("dicom", "nifti", "nifti-gz", *_IMAGE_SUFFIX)


def _member_heads(
    zf: zipfile.ZipFile, members: list[zipfile.ZipInfo]
) -> list[tuple[zipfile.ZipInfo, bytes, str]]:
    """Each member's first 64 KiB (decompressed) and the kind they show."""
    heads = []
    for member in members:
        with zf.open(member) as src:
            head = src.read(_HEAD_BYTES)
        heads.append((member, head, sniff_bytes(head)))
    return heads


def _unpacked_too_large(limit: int) -> str:
    return f"the zip unpacks to more than {limit / 1024**2:.0f} MiB"


__all__ = [
    "FILES_FIELD",
    "UploadError",
    "UploadForm",
    "public_message",
    "read_multipart",
    "scan_path",
    "sniff",
]
