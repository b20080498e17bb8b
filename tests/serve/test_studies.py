"""Study sessions: upload once, then pixels, display images and model runs by id; private,
expiring, capped; geometry checked against pydicom and nibabel directly."""

from __future__ import annotations

import io
import stat
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from radgrounder.imaging import display_image, load_scan
from radgrounder.serve import create_app
from tests.serve.conftest import NIFTI, GroundTruthPredictor, PredictorProxy

BASE = "http://127.0.0.1"


def files_of(paths: list[Path]) -> list[tuple[str, Any]]:
    return [("files", (p.name, p.read_bytes())) for p in paths]


@pytest.fixture
def client(detection_predictor: Any) -> TestClient:
    with TestClient(create_app(detection_predictor), base_url=BASE) as c:
        yield c


def test_a_dicom_study_keeps_its_geometry_and_raw_values(
    client: TestClient, dicom_files: list[Path]
) -> None:
    r = client.post("/v1/studies", files=files_of(dicom_files[::-1]))
    assert r.status_code == 201, r.text
    meta = r.json()
    assert len(meta["study_id"]) == 32
    assert (meta["n_slices"], meta["width"], meta["height"]) == (20, 512, 512)
    assert (meta["modality"], meta["kind"], meta["channels"]) == ("CT", "dicom-series", 1)
    assert meta["pixel_dtype"] == "int16"
    # Axial slices in the radiological view: patient right on the screen's left.
    assert meta["orientation"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # Slice positions equal the files' own z (ImagePositionPatient), inferior first.
    datasets = [pydicom.dcmread(p) for p in dicom_files]
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)
    assert meta["position_axis"] == "S"
    np.testing.assert_allclose(meta["slice_positions_mm"], z, atol=1e-3)
    assert meta["spacing_mm"][1:] == pytest.approx([float(v) for v in datasets[0].PixelSpacing])
    assert meta["windows"]["lung"] == {"center": -600.0, "width": 1500.0}
    assert 1700 < meta["expires_in_s"] <= 1800
    sid = meta["study_id"]
    assert client.get(f"/v1/studies/{sid}").json()["n_slices"] == 20
    # Raw HU of slice k, little-endian int16, equal to pydicom's own decoding.
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k in (0, 7, 19):
        r = client.get(f"/v1/studies/{sid}/slices/{k}/pixels")
        assert r.headers["x-pixel-dtype"] == "int16" and r.headers["x-rows"] == "512"
        pixels = np.frombuffer(r.content, "<i2").reshape(512, 512)
        ds = by_z[k]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # Canonical columns run patient right -> left, as the DICOM rows already do.
        np.testing.assert_array_equal(pixels, hu.astype(np.int16))
    # A display image in a chosen window, as the one-shot endpoint renders it.
    png = client.get(f"/v1/studies/{sid}/slices/7/image", params={"window": "lung"})
    assert png.headers["content-type"] == "image/png"
    volume = load_scan(dicom_files[0].parent)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png.content))),
        display_image(volume.data[7], "CT", preset="lung"),
    )
    for bad, status in (("20", 422), ("-1", 422), ("x", 422)):
        assert client.get(f"/v1/studies/{sid}/slices/{bad}/pixels").status_code == status
    assert client.get(f"/v1/studies/{sid}/slices/1/image?window=fog").status_code == 422
    assert client.get("/v1/studies/" + "0" * 32).status_code == 404


def test_nifti_and_photo_studies(client: TestClient, tmp_path: Path) -> None:
    meta = client.post("/v1/studies", files=files_of([NIFTI])).json()
    img = nib.as_closest_canonical(nib.load(NIFTI))
    assert meta["n_slices"] == img.shape[2] and meta["modality"] == "CT"
    assert meta["orientation"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    z = img.affine[2, 3] + img.affine[2, 2] * np.arange(img.shape[2])
    np.testing.assert_allclose(meta["slice_positions_mm"], z, atol=1e-3)
    photo = tmp_path / "photo.png"
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photo)
    meta = client.post("/v1/studies", files=files_of([photo])).json()
    assert (meta["channels"], meta["pixel_dtype"], meta["orientation"]) == (3, "uint8", None)
    assert meta["slice_positions_mm"] is None
    r = client.get(f"/v1/studies/{meta['study_id']}/slices/0/pixels")
    np.testing.assert_array_equal(np.frombuffer(r.content, np.uint8).reshape(40, 60, 3), rgb)


def test_a_run_on_a_stored_study_equals_the_one_shot_run(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    proxy = GroundTruthPredictor(detection_predictor)
    with TestClient(create_app(proxy), base_url=BASE) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        fields = {"task": "grounded-report", "language": "de", "slice": "4", "max_new_tokens": "3"}
        stored = c.post(f"/v1/studies/{sid}/predict", data=fields)
        one_shot = c.post("/v1/predict", files=files_of(dicom_files), data=fields)
        as_multipart = c.post(
            f"/v1/studies/{sid}/predict", files={k: (None, v) for k, v in fields.items()}
        )
        with_files = c.post(f"/v1/studies/{sid}/predict", files=files_of(dicom_files[:1]))
    assert stored.status_code == 200 and one_shot.status_code == 200
    a, b = stored.json()["predictions"][0], one_shot.json()["predictions"][0]
    assert a["slice_index"] == b["slice_index"] == 4
    assert a["spans"] == b["spans"] and a["text"] == b["text"] and a["spans"]
    assert as_multipart.json()["predictions"][0]["spans"] == a["spans"]
    assert with_files.status_code == 400 and "takes no files" in with_files.json()["detail"]
    # Both requests prepared the same model input.
    first, second = proxy.run_calls[:2]
    assert first["n_items"] == second["n_items"] == 1


def test_studies_expire_and_are_deleted(detection_predictor: Any, dicom_files: list[Path]) -> None:
    app = create_app(detection_predictor, study_ttl_s=0.5)
    with TestClient(app, base_url=BASE) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files[:3])).json()["study_id"]
        store = app.state.studies
        (folder,) = store.root.iterdir()
        assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
        time.sleep(0.3)
        assert c.get(f"/v1/studies/{sid}").status_code == 200  # use renews the lease
        time.sleep(0.3)
        assert c.get(f"/v1/studies/{sid}").status_code == 200
        time.sleep(0.7)
        r = c.get(f"/v1/studies/{sid}/slices/0/pixels")
        assert r.status_code == 404 and "upload it again" in r.json()["detail"]
        assert not folder.exists()
        assert c.post(f"/v1/studies/{sid}/predict", data={}).status_code == 404


def test_storage_is_capped_least_recently_used_first(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    one = 3 * 512 * 512 * 4  # three float32 slices
    app = create_app(detection_predictor, study_storage_bytes=2 * one + 1000)
    with TestClient(app, base_url=BASE) as c:
        ids = [
            c.post("/v1/studies", files=files_of(dicom_files[k : k + 3])).json()["study_id"]
            for k in (0, 3)
        ]
        c.get(f"/v1/studies/{ids[0]}")  # the first is now the most recently used
        third = c.post("/v1/studies", files=files_of(dicom_files[6:9])).json()["study_id"]
        assert c.get(f"/v1/studies/{ids[1]}").status_code == 404  # evicted
        assert c.get(f"/v1/studies/{ids[0]}").status_code == 200
        assert c.get(f"/v1/studies/{third}").status_code == 200
        assert app.state.studies.used_bytes <= 2 * one + 1000
        assert len(list(app.state.studies.root.iterdir())) == 2
        r = c.post("/v1/studies", files=files_of(dicom_files[:12]))
        assert r.status_code == 413 and "--study-storage-mb" in r.json()["detail"]


def test_a_stored_study_reads_only_the_slices_a_run_needs(
    detection_predictor: Any, dicom_files: list[Path]
) -> None:
    seen: list[Any] = []
    proxy = PredictorProxy(detection_predictor)
    real_prepare = proxy.prepare

    def prepare(images: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        seen.extend(images)
        return real_prepare(images, *args, **kwargs)

    proxy.prepare = prepare  # type: ignore[method-assign]
    with TestClient(create_app(proxy), base_url=BASE) as c:
        sid = c.post("/v1/studies", files=files_of(dicom_files)).json()["study_id"]
        r = c.post(f"/v1/studies/{sid}/predict", data={"slice": "2", "max_new_tokens": "2"})
    assert r.status_code == 200
    (image,) = seen
    # A view into the memory-mapped study, not a decoded copy of the series.
    assert isinstance(image.pixels, np.memmap) or isinstance(image.pixels.base, np.memmap)
    assert image.index == 2 and image.source == "upload"
