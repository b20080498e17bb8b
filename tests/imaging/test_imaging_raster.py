"""PNG / JPEG / TIFF / BMP images read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import read_image


def _gradient(h: int = 20, w: int = 30) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_grayscale_png(tmp_path: Path) -> None:
    pixels = _gradient()
    Image.fromarray(pixels).save(tmp_path / "g.png")
    vol = read_image(tmp_path / "g.png")
    assert vol.shape == (1, 20, 30)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data[0], pixels)
    assert vol.modality is None and vol.kind == "image" and not vol.is_rgb
    assert vol.orientation == "SPL" and vol.spacing == (1.0, 1.0, 1.0)
    assert vol.slice(0).pixel_spacing == (1.0, 1.0)


def test_16bit_png_keeps_raw_values(tmp_path: Path) -> None:
    pixels = np.array([[0, 1000], [3000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    vol = read_image(tmp_path / "g16.png")
    assert vol.metadata["image_mode"].startswith("I")
    np.testing.assert_array_equal(vol.data[0], pixels.astype(np.float32))


def test_float_tiff(tmp_path: Path) -> None:
    pixels = np.array([[-1000.5, 0.0], [40.25, 3000.0]], dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif").data[0], pixels)


def test_rgb_png_and_rgba_and_palette(tmp_path: Path) -> None:
    rgb = np.stack([_gradient(), 255 - _gradient(), np.full((20, 30), 7, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    vol = read_image(tmp_path / "c.png")
    assert vol.shape == (1, 20, 30, 3) and vol.is_rgb
    np.testing.assert_array_equal(vol.data[0], rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").data[0], rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.bmp")
    assert read_image(tmp_path / "p.bmp").shape == (1, 20, 30, 3)


def test_jpeg_rgb_and_gray(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    vol = read_image(tmp_path / "c.jpg")
    assert vol.shape == (1, 32, 32, 3)
    assert abs(float(vol.data[0, ..., 0].mean()) - 200) < 3
    Image.fromarray(np.full((16, 8), 90, np.uint8)).save(tmp_path / "g.jpeg")
    gray = read_image(tmp_path / "g.jpeg")
    assert gray.shape == (1, 16, 8)
    assert abs(float(gray.data.mean()) - 90) < 2


def test_modality_argument_for_grayscale_exports(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    vol = read_image(tmp_path / "g.png", modality="mr")
    assert (vol.modality, vol.metadata["modality_source"]) == ("MR", "argument")
    # Gray saved as RGB (three equal channels) collapses to one channel.
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "g3.png")
    assert read_image(tmp_path / "g3.png", modality="CT").shape == (1, 20, 30)
    rgb = np.stack([_gradient(), 255 - _gradient(), _gradient()], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(RadGrounderError, match=r"c\.png.*colour image cannot be read as CT"):
        read_image(tmp_path / "c.png", modality="CT")
