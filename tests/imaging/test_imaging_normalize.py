"""Normalisation presets, resizing and the preprocessing pipelines (spec §4.2-4.4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from radgrounder.errors import RadGrounderError
from radgrounder.imaging import (
    PRESETS,
    WINDOWS,
    Volume,
    clamp_ct,
    display_image,
    normalize,
    preprocess_rgb_image,
    preprocess_slice,
    resize_bilinear,
)


def _numpy_bilinear(chw: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel bilinear, written independently of torch.

    Source coordinates are computed in float32 as torch's CPU kernel does; in float64 they
    drift by up to ~1e-4 on a 512 -> 224 resize.
    """
    f32 = np.float32

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = f32(n_in) / f32(out)
        src = np.maximum((np.arange(out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float64)

    r0, r1, wr = taps(chw.shape[1])
    c0, c1, wc = taps(chw.shape[2])
    rows = chw[:, r0, :] * (1 - wr)[None, :, None] + chw[:, r1, :] * wr[None, :, None]
    return rows[:, :, c0] * (1 - wc) + rows[:, :, c1] * wc


def test_windows_and_presets_tables() -> None:
    assert WINDOWS["reference_lung"] == (2250, -100)
    assert WINDOWS["reference_soft_tissue"] == (350, 40)
    assert WINDOWS["reference_brain"] == (80, 40)
    assert WINDOWS["lung"] == (1500, -600) and WINDOWS["bone"] == (1800, 400)
    assert WINDOWS["liver"] == (150, 30) and WINDOWS["soft_tissue"] == (400, 40)
    assert set(PRESETS) == {
        "reference", "dataset_stats", "min_max", "lung", "soft_tissue", "bone", "brain", "liver"
    }  # fmt: skip


def test_clamp_ct_is_lower_only() -> None:
    np.testing.assert_array_equal(
        clamp_ct(np.array([-3000.0, -1000, 0, 5000])), [-1000, -1000, 0, 5000]
    )


def test_reference_ct_exact_values() -> None:
    hu = np.array([[-2000.0, 40.0], [1025.0, 80.0]], dtype=np.float32)
    out = normalize(hu, "CT")
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    # -2000 is clamped to -1000 first: air is -0.8 in the lung channel.
    assert out[0, 0, 0] == pytest.approx((-1000 + 1225) / (2250 + 1e-5) * 2 - 1, abs=1e-6)
    assert out[0, 0, 0] == pytest.approx(-0.8, abs=1e-5)
    assert out[0, 1, 0] == pytest.approx(1.0, abs=1e-5)
    assert out[1, 0, 1] == pytest.approx(0.0, abs=1e-6)  # 40 HU, soft tissue window centre
    assert out[2, 0, 1] == pytest.approx(0.0, abs=1e-6)  # 40 HU, brain window centre
    assert out[2, 1, 1] == pytest.approx(1.0, abs=1e-5)
    assert out[1, 0, 0] == -1.0 and out[2, 0, 0] == -1.0
    # "medgemma" is the reference code's name for the same preset.
    np.testing.assert_array_equal(normalize(hu, "ct", "medgemma"), out)


def test_reference_mr_and_rgb_min_max() -> None:
    mr = np.array([[10.0, 20.0], [30.0, 410.0]])
    out = normalize(mr, "MR")
    assert out.shape == (1, 2, 2)
    assert out.min() == -1.0 and out.max() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 0, 1] == pytest.approx((20 - 10) / (400 + 1e-5) * 2 - 1, abs=1e-6)
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0, 0], rgb[1, 1, 2] = 0.5, 1.0
    out = normalize(rgb, None)
    assert out.shape == (3, 2, 2)
    # Min-max runs over all channels jointly, not per channel.
    assert out[0].max() == pytest.approx(0.0, abs=2e-5)
    assert out[2].max() == pytest.approx(1.0, abs=3e-5)
    assert out[1].max() == -1.0


def test_dataset_stats() -> None:
    ct = normalize(np.array([[-3000.0, 5000.0], [-610.19085, 127.19740]]), "CT", "dataset_stats")
    np.testing.assert_allclose(
        ct[0], [[(-1000 + 610.19085) / 737.38825, 2.0], [0.0, 1.0]], atol=1e-6
    )
    mr = normalize(np.array([[141.1155, -1000.0]]), "MR", "dataset_stats")
    np.testing.assert_allclose(mr[0], [[0.0, -2.0]], atol=1e-6)
    rgb = np.full((1, 1, 3), 0.2526479 + 0.2969230, np.float32)
    np.testing.assert_allclose(normalize(rgb, None, "dataset_stats", rgb_stats="slake"), 1.0, 1e-5)
    vqa = normalize(np.zeros((1, 1, 3)), None, "dataset_stats", rgb_stats="vqa_rad")
    np.testing.assert_allclose(vqa, -0.3090255 / 0.2935555, atol=1e-6)
    with pytest.raises(RadGrounderError, match="rgb_stats"):
        normalize(rgb, None, "dataset_stats")
    with pytest.raises(RadGrounderError, match="slake"):
        normalize(rgb, None, "dataset_stats", rgb_stats="imagenet")


def test_min_max() -> None:
    ct = normalize(np.array([[-2000.0, 1000.0], [3000.0, 9000.0]]), "CT", "min_max")
    np.testing.assert_allclose(ct[0], [[0.0, 0.5], [1.0, 1.0]], atol=1e-5)
    mr = normalize(np.array([[-50.0, 2048.0, 9000.0]]), "MR", "min_max")
    np.testing.assert_allclose(mr[0], [[0.0, 0.5, 1.0]], atol=1e-5)
    plain = normalize(np.array([[2.0, 4.0]]), None, "min_max")
    np.testing.assert_allclose(plain[0], [[0.0, 1.0]], atol=1e-5)


def test_viewing_presets() -> None:
    out = normalize(np.array([[-600.0, 150.0, -1000.0, -1350.0]]), "CT", "lung")
    assert out.shape == (1, 1, 4)
    # The -1000 HU pre-clamp applies to every CT preset, so -1350 reads as -1000.
    air = (-1000 + 1350) / (1500 + 1e-5) * 2 - 1
    np.testing.assert_allclose(out[0, 0], [0.0, 1.0, air, air], atol=1e-5)
    assert normalize(np.array([[400.0]]), "CT", "bone")[0, 0, 0] == pytest.approx(0, abs=1e-6)
    for modality in ("MR", None):
        with pytest.raises(RadGrounderError, match="'lung' is a CT window"):
            normalize(np.zeros((2, 2)), modality, "lung")


def test_bad_preset_and_modality_and_shape() -> None:
    with pytest.raises(RadGrounderError) as err:
        normalize(np.zeros((2, 2)), "CT", "hounsfield")
    assert "'hounsfield'" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)
    with pytest.raises(RadGrounderError, match=r"unsupported modality 'PET' \(expected CT or MR\)"):
        normalize(np.zeros((2, 2)), "PET")
    with pytest.raises(RadGrounderError, match="RGB pixels need modality None"):
        normalize(np.zeros((2, 2, 3)), "CT")
    with pytest.raises(RadGrounderError, match="shape"):
        normalize(np.zeros((2, 2, 2)), "MR")
    with pytest.raises(RadGrounderError, match="1 of 4 pixel values are NaN"):
        normalize(np.array([[0.0, np.nan], [1.0, 2.0]]), "MR")


finite = st.floats(-5000, 5000, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=finite))
def test_normalize_bounds(pixels: np.ndarray) -> None:
    ref_ct = normalize(pixels, "CT")
    assert ref_ct.shape == (3, *pixels.shape)
    assert ref_ct.min() >= -1.0 and ref_ct.max() <= 1.0
    ref_mr = normalize(pixels, "MR")
    assert ref_mr.min() >= -1.0 and ref_mr.max() <= 1.0
    assert ref_mr.min() == -1.0
    for mod in ("CT", "MR"):
        stats = normalize(pixels, mod, "dataset_stats")
        assert stats.min() >= -2.0 and stats.max() <= 2.0
        mm = normalize(pixels, mod, "min_max")
        assert mm.min() >= 0.0 and mm.max() <= 1.0
    for preset in ("lung", "soft_tissue", "bone", "brain", "liver"):
        win = normalize(pixels, "CT", preset)
        assert win.min() >= -1.0 and win.max() <= 1.0


def test_resize_bilinear_matches_half_pixel_numpy() -> None:
    rng = np.random.default_rng(0)
    chw = rng.uniform(-1, 1, size=(3, 512, 512)).astype(np.float32)
    out = resize_bilinear(chw, 224)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, _numpy_bilinear(chw.astype(np.float64), 224), atol=1e-5)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(chw)[None], size=(224, 224), mode="bilinear", antialias=True
    )[0].numpy()
    assert np.abs(out - smooth).max() > 0.1
    up = rng.uniform(size=(1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(resize_bilinear(up, 8), _numpy_bilinear(up, 8), atol=1e-6)
    assert resize_bilinear(up[0], 3).shape == (1, 3, 3)


def test_preprocess_slice_ct_and_mr(ct_series: Volume, mr_sm: Volume) -> None:
    sl = ct_series.slice(10)
    out = preprocess_slice(sl)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    expected = resize_bilinear(normalize(clamp_ct(sl.pixels), "CT"), 224)
    np.testing.assert_array_equal(out, expected)
    assert out.min() >= -1 and out.max() <= 1
    np.testing.assert_array_equal(preprocess_slice(sl.pixels, "CT"), out)
    mr = preprocess_slice(mr_sm.slice(5), size=64)
    assert mr.shape == (3, 64, 64)
    np.testing.assert_array_equal(mr[0], mr[1])
    np.testing.assert_array_equal(mr[0], mr[2])
    one = preprocess_slice(ct_series.slice(0), preset="soft_tissue", size=32)
    assert one.shape == (3, 32, 32)
    np.testing.assert_array_equal(one[0], one[2])


def test_preprocess_rgb_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(10, 240, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    out = preprocess_rgb_image(tmp_path / "photo.png")
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    assert out.min() == -1.0 and out.max() == pytest.approx(1.0, abs=1e-4)
    resized = Image.fromarray(rgb).resize((224, 224), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / 255
    stats = preprocess_rgb_image(Image.fromarray(rgb), preset="dataset_stats", rgb_stats="slake")
    # Standardised without a clamp (the reference clamps CT/MR only): bright pixels > 2.
    expected = ((x - 0.2526479) / 0.2969230).transpose(2, 0, 1)
    np.testing.assert_allclose(stats, expected, atol=1e-6)
    assert stats.max() > 2.4
    ct = normalize(np.full((4, 4), 3000.0), "CT", "dataset_stats")
    assert ct.max() == 2.0  # CT/MR keep the [-2, 2] clamp
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(RadGrounderError, match=r"broken\.png: cannot read image file"):
        preprocess_rgb_image(tmp_path / "broken.png")
    with pytest.raises(RadGrounderError, match="zero-size"):
        preprocess_rgb_image(Image.new("RGB", (0, 4)))


def test_display_image() -> None:
    ct = display_image(np.array([[-1000.0, -160.0], [40.0, 240.0]]), "CT")
    assert ct.dtype == np.uint8
    np.testing.assert_array_equal(ct, [[0, 0], [128, 255]])
    lung = display_image(np.array([[-1350.0, 150.0]]), "CT", preset="lung")
    np.testing.assert_array_equal(lung, [[0, 255]])
    mr = display_image(np.arange(100, dtype=np.float32).reshape(10, 10) * 7, "MR")
    assert mr.min() == 0 and mr.max() == 255
    rgb = display_image(np.array([[[-5.0, 100.4, 300.0]]]), None)
    np.testing.assert_array_equal(rgb, [[[0, 100, 255]]])
    assert display_image(np.full((3, 3), 5.0), None).max() == 0
    with pytest.raises(RadGrounderError, match="unknown display window"):
        display_image(np.zeros((2, 2)), "CT", preset="kidney")
