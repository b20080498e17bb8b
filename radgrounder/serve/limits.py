"""Every limit the server enforces, with its default (docs/serving.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1024**2


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and all requests together, may cost the machine."""

    # Uploads
    max_upload_bytes: int = 512 * MiB  # one request body (413 beyond)
    max_unpacked_factor: int = 4  # a zip may unpack to this times max_upload_bytes
    max_voxels: int = 2**29  # decoded voxels per study, checked from the headers (413)
    max_concurrent_uploads: int = 4  # bodies being received/decoded at once (503 beyond)
    upload_idle_timeout_s: float = 30.0  # no body bytes for this long: 408
    upload_timeout_s: float = 600.0  # a whole body slower than this: 408
    # Prompts and generation
    max_prompt_tokens: int = 256  # question + clinical fields + template, in tokens (422)
    max_new_tokens: int = 512  # per request field max_new_tokens (422 beyond)
    # The model queue
    max_batch: int = 8  # items per model call
    batch_window_s: float = 0.02  # how long an idle batcher waits to fill a call
    max_queued_items: int = 64  # items waiting or running (503 + Retry-After beyond)
    request_timeout_s: float = 300.0  # from admission to answer (504 beyond)
    # Studies kept between requests
    study_storage_bytes: int = 4096 * MiB  # all stored studies together (LRU eviction)
    study_ttl_s: float = 1800.0  # a study unused this long is deleted
    # Connections (uvicorn)
    header_timeout_s: float = 10.0  # request headers must arrive within this
    keep_alive_timeout_s: int = 5  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open connections + running requests (503 beyond)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name != "batch_window_s"):
                raise ValueError(f"{f.name}: must be positive, got {value}")

    @property
    def max_unpacked_bytes(self) -> int:
        return self.max_unpacked_factor * self.max_upload_bytes
