"""Study sessions: a study is uploaded and decoded once, kept server-side in a private folder
as a memory-mapped array, and every later request (a slice's pixels, a display image, a
model run) refers to it by an unguessable id and reads only the slices it needs.

Studies expire after ``ttl_s`` seconds without use, are evicted least recently used first
when the store would exceed ``max_bytes``, and are deleted from disk on expiry, eviction,
``DELETE`` and server shutdown.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from radgrounder.imaging import WINDOWS, Volume
from radgrounder.serve.uploads import UploadError

_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_INT16 = np.iinfo(np.int16)


def geometry(volume: Volume) -> dict[str, Any]:
    """Screen-edge orientation letters and slice positions of a volume (None for photos).

    Slices are shown with rows down and columns right, so the right edge is the patient
    direction the column axis runs to and the bottom edge the one the row axis runs to (RAS
    axis codes of the canonical affine; the dominant axis for oblique planes). The position
    of slice ``k`` is its origin's coordinate along the patient axis the slice axis follows.
    """
    if volume.kind == "image" or volume.modality is None:
        return {"orientation": None, "slice_positions_mm": None, "position_axis": None}
    codes = [str(c) for c in nib.aff2axcodes(volume.affine)]
    direction = volume.affine[:3, 0]
    axis = int(np.argmax(np.abs(direction)))
    origins = volume.affine[:3, 3][axis] + direction[axis] * np.arange(volume.n_slices)
    # RAS coordinates: "S" positions are +z, "I" positions would be -z, and so on.
    letter = "RAS"[axis]
    return {
        "orientation": {
            "left": _OPPOSITE[codes[2]],
            "right": codes[2],
            "top": _OPPOSITE[codes[1]],
            "bottom": codes[1],
        },
        "slice_positions_mm": [round(float(v), 3) for v in origins],
        "position_axis": letter,
    }


def display_windows(volume: Volume) -> tuple[dict[str, dict[str, float]], str]:
    """Window presets (center/width) a viewer can apply to the raw values, and the default."""
    if volume.modality == "CT":
        presets = {
            name: {"center": level, "width": width}
            for name, (width, level) in WINDOWS.items()
            if not name.startswith("reference_")
        }
        return presets, "soft_tissue"
    if volume.is_rgb:
        return {}, ""
    flat = volume.data.ravel()
    if flat.size > 4_000_000:
        flat = flat[:: flat.size // 4_000_000 + 1]
    low, high = (float(v) for v in np.percentile(flat, [1, 99]))
    width = max(high - low, 1e-6)
    return {"auto": {"center": (low + high) / 2, "width": width}}, "auto"


@dataclass
class Study:
    """One stored study: its metadata and a read-only memory map of its (canonical) pixels."""

    id: str
    folder: Path
    volume: Volume  # ``data`` is the memory map; nothing else is held in memory
    image_path: Path | None  # the uploaded photo itself (kind ``image`` without a modality)
    meta: dict[str, Any]
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)

    def pixels(self, k: int) -> np.ndarray:
        """Slice ``k`` in ``meta['pixel_dtype']`` (the bytes sent to viewers)."""
        return np.ascontiguousarray(self.volume.data[k]).astype(
            self.meta["pixel_dtype"], copy=False
        )


class StudyStore:
    """Thread-safe store of :class:`Study` objects under a private (0700) folder."""

    def __init__(self, *, max_bytes: int, ttl_s: float, root: Path | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"study storage: must be positive, got {max_bytes} bytes")
        if ttl_s <= 0:
            raise ValueError(f"study ttl: must be positive, got {ttl_s} s")
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self.root = Path(tempfile.mkdtemp(prefix="radgrounder-studies-", dir=root))
        self.root.chmod(0o700)
        self._studies: dict[str, Study] = {}
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------

    def add(self, volume: Volume, image_path: Path | None = None) -> Study:
        """Store ``volume`` (decoded from an upload; ``image_path`` for photos, which the
        predictor reads from their file) and return its study."""
        nbytes = int(volume.data.nbytes) + (image_path.stat().st_size if image_path else 0)
        if nbytes > self.max_bytes:
            raise UploadError(
                413,
                f"the study needs {nbytes / 1024**2:.0f} MiB; the server keeps at most "
                f"{self.max_bytes / 1024**2:.0f} MiB of studies (--study-storage-mb)",
            )
        with self._lock:
            self._expire_locked()
            self._evict_locked(nbytes)
        study_id = secrets.token_hex(16)
        folder = self.root / study_id
        folder.mkdir(mode=0o700)
        try:
            study = self._write(study_id, folder, volume, image_path, nbytes)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self._studies[study_id] = study
            # Another upload may have been stored meanwhile.
            self._evict_locked(0, keep=study_id)
        return study

    def get(self, study_id: str) -> Study:
        """The study ``study_id``; 404 when it is unknown, expired or evicted."""
        with self._lock:
            self._expire_locked()
            study = self._studies.get(study_id)
            if study is None:
                raise UploadError(
                    404, "unknown or expired study: upload it again (POST /v1/studies)"
                )
            study.last_used = time.monotonic()
            return study

    def delete(self, study_id: str) -> None:
        with self._lock:
            study = self._studies.pop(study_id, None)
        if study is None:
            raise UploadError(404, "unknown or expired study")
        _remove(study)

    def expire(self) -> int:
        """Delete studies unused for ``ttl_s``; the number deleted."""
        with self._lock:
            return self._expire_locked()

    def close(self) -> None:
        """Delete every study and the store's folder."""
        with self._lock:
            studies, self._studies = list(self._studies.values()), {}
        for study in studies:
            _remove(study)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._studies.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._studies)

    def expires_in(self, study: Study) -> int:
        return max(0, round(study.last_used + self.ttl_s - time.monotonic()))

    # -- internals -----------------------------------------------------------------------

    def _write(
        self, study_id: str, folder: Path, volume: Volume, image_path: Path | None, nbytes: int
    ) -> Study:
        data = volume.data
        dtype = "uint8" if volume.is_rgb else "float32"
        if not volume.is_rgb:
            low, high = float(data.min()), float(data.max())
            in_range = low >= _INT16.min and high <= _INT16.max
            # Slice by slice: no second copy of a large volume.
            if in_range and all(np.array_equal(s, np.rint(s)) for s in data):
                dtype = "int16"
        else:
            low, high = 0.0, 255.0
        np.save(folder / "pixels.npy", data, allow_pickle=False)
        mapped = np.load(folder / "pixels.npy", mmap_mode="r", allow_pickle=False)
        photo = None
        if image_path is not None:
            photo = folder / f"image{''.join(image_path.suffixes)}"
            shutil.copyfile(image_path, photo)
        windows, default = display_windows(volume)
        height, width = data.shape[1:3]
        meta = {
            "study_id": study_id,
            "n_slices": volume.n_slices,
            "kind": volume.kind,
            "modality": volume.modality,
            "width": int(width),
            "height": int(height),
            "channels": 3 if volume.is_rgb else 1,
            "pixel_dtype": dtype,
            "spacing_mm": [float(s) for s in volume.spacing],
            **geometry(volume),
            "value_range": [low, high],
            "windows": windows,
            "default_window": default,
        }
        stored = Volume(
            data=mapped,
            affine=volume.affine,
            spacing=volume.spacing,
            modality=volume.modality,
            source="upload",
            kind=volume.kind,
            orientation=volume.orientation,
            source_orientation=volume.source_orientation,
        )
        return Study(study_id, folder, stored, photo, meta, nbytes)

    def _expire_locked(self) -> int:
        now = time.monotonic()
        old = [k for k, s in self._studies.items() if now - s.last_used > self.ttl_s]
        for key in old:
            _remove(self._studies.pop(key))
        return len(old)

    def _evict_locked(self, incoming: int, keep: str | None = None) -> None:
        used = sum(s.nbytes for s in self._studies.values())
        for key in sorted(self._studies, key=lambda k: self._studies[k].last_used):
            if used + incoming <= self.max_bytes:
                return
            if key == keep:
                continue
            study = self._studies.pop(key)
            used -= study.nbytes
            _remove(study)


def _remove(study: Study) -> None:
    # Open memory maps stay valid after the file is unlinked (a request still reading a
    # slice finishes it); the space is freed when the last map closes.
    with contextlib.suppress(OSError):
        shutil.rmtree(study.folder)
