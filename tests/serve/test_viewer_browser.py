"""The web viewer in a real browser: Debian's Chromium driven by Playwright against the app
served by uvicorn on 127.0.0.1.

Run with ``pytest -m browser``. Without a Chromium binary the tests skip, except in CI (the
``CI`` environment variable set), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from radgrounder.serve import create_app
from radgrounder.visualize import class_color
from tests.serve.conftest import GroundTruthPredictor, live_server

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
TIMEOUT_MS = 30_000


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it (see APT_PACKAGES in .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        _unavailable("no chromium binary found (Debian package 'chromium')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the viewer: {errors}"


def _save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    artifacts = os.environ.get("RADGROUNDER_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        copy = Path(artifacts) / name
        shutil.copyfile(path, copy)
        print(f"screenshot: {copy}")
    return path


def _canvas_pixels(page: Any, x: int, y: int) -> list[int]:
    return page.evaluate(
        """([x, y]) => Array.from(document.getElementById('slice-canvas')
            .getContext('2d').getImageData(x, y, 1, 1).data)""",
        [x, y],
    )


def _canvas_stats(page: Any) -> dict[str, float]:
    """Mean and spread of the canvas' grey values and a checksum, to tell slices apart."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('slice-canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let sum = 0, sq = 0, hash = 0;
            for (let i = 0; i < d.length; i += 4) {
                sum += d[i]; sq += d[i] * d[i]; hash = (hash * 31 + d[i]) % 1000000007;
            }
            const n = d.length / 4, mean = sum / n;
            return {mean, std: Math.sqrt(sq / n - mean * mean), hash};
        }"""
    )


def _load_study(page: Any, files: list[Path], expected_index: int) -> None:
    page.set_input_files("#file-input", [str(p) for p in files])
    page.wait_for_selector(f"#slice-canvas[data-slice-index='{expected_index}']")


def test_viewer_shows_slices_and_grounded_phrases(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    # The tiny random model writes random text, so the grounded phrase is made
    # deterministic: a predictor wrapper keeps everything real (upload, preprocessing,
    # batching, generation, the response) and swaps each decoded answer for the fixed
    # markup "The <p bbox=<loc0100><loc0120><loc0300><loc0320> id=<seg005>>liver</p> is
    # normal." (see GroundTruthPredictor).
    app = create_app(GroundTruthPredictor(detection_predictor))
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        assert page.input_value("#task-select") == "grounded-report"

        # A damaged upload shows the server's message and leaves the page usable.
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(dicom_files[0].read_bytes()[:700])
        page.set_input_files("#file-input", [str(broken)])
        page.wait_for_selector("#error:not([hidden])")
        assert "cannot read the scan" in page.text_content("#error")

        _load_study(page, dicom_files, 10)
        assert page.is_hidden("#error")
        assert page.text_content("#slice-label") == "slice 11 / 20"
        stats = _canvas_stats(page)
        assert stats["std"] > 10, f"the slice canvas looks blank: {stats}"

        # Scroll: mouse wheel over the canvas, then the slider.
        page.hover("#slice-canvas")
        page.mouse.wheel(0, 120)
        page.wait_for_selector("#slice-canvas[data-slice-index='11']")
        page.fill("#slice-slider", "4")
        page.wait_for_selector("#slice-canvas[data-slice-index='4']")
        assert _canvas_stats(page)["hash"] != stats["hash"]

        page.fill("#max-tokens-input", "4")
        page.click("#run-button")
        page.wait_for_selector("#report[data-state='result']")
        assert page.get_attribute("#status", "data-state") == "done"
        phrases = page.locator("#report .phrase")
        assert phrases.count() == 1
        assert phrases.first.text_content() == "liver"
        assert "The liver is normal." in page.text_content("#report")
        assert page.text_content("#legend") == "liver"

        # The box is drawn in the class colour.
        (box,) = json.loads(page.get_attribute("#slice-canvas", "data-boxes"))
        color = class_color(5)
        assert box["color"] == "#{:02x}{:02x}{:02x}".format(*color)
        assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (100, 120, 300, 320)
        for x, y in ((box["x1"], 220), (200, box["y1"]), (box["x2"] - 1, 220)):
            pixel = _canvas_pixels(page, x, y)
            assert all(abs(a - b) <= 2 for a, b in zip(pixel[:3], color, strict=True)), pixel

        # Hovering the phrase highlights its box; hovering the box highlights the phrase.
        phrases.first.hover()
        page.wait_for_selector("#slice-canvas[data-highlight='0']")
        assert phrases.first.get_attribute("data-active") == "true"
        assert page.get_attribute("#legend li", "data-active") == "true"
        page.mouse.move(5, 5)
        page.wait_for_selector("#slice-canvas[data-highlight='']")
        assert phrases.first.get_attribute("data-active") == "false"
        canvas = page.locator("#slice-canvas").bounding_box()
        scale = canvas["width"] / 512
        page.mouse.move(canvas["x"] + 200 * scale, canvas["y"] + 220 * scale)
        page.wait_for_selector("#report .phrase[data-active='true']")
        assert page.get_attribute("#slice-canvas", "data-highlight") == "0"
        shot = _save_screenshot(page, tmp_path, "viewer-grounded.png")
        assert shot.stat().st_size > 10_000

        # The raw response can be downloaded.
        with page.expect_download() as info:
            page.click("#download-json")
        saved = json.loads(Path(info.value.path()).read_text())
        assert saved["predictions"][0]["spans"][0]["class_id"] == 5

        # Results belong to their slice; other slices show none.
        page.fill("#slice-slider", "7")
        page.wait_for_selector("#slice-canvas[data-slice-index='7']")
        assert page.get_attribute("#report", "data-state") == "empty"
        assert json.loads(page.get_attribute("#slice-canvas", "data-boxes")) == []
        page.click("[data-goto-slice='4']")
        page.wait_for_selector("#report[data-state='result']")

        # German: all slices, legend with German display names.
        page.select_option("#language-select", "de")
        page.check("#scope-all")
        page.click("#run-button")
        page.wait_for_selector("#status[data-state='done']")
        assert "20 prediction(s)" in page.text_content("#status")
        assert page.text_content("#legend") == "Leber"


def test_viewer_asks_for_the_token(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    app = create_app(detection_predictor, token="browser-secret")
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#auth-panel:not([hidden])")
        assert page.get_attribute("#model-info", "data-variant") == ""
        page.fill("#token-input", "wrong")
        page.click("#token-submit")
        page.wait_for_function(
            "document.getElementById('auth-message').textContent.includes('not accepted')"
        )
        assert page.is_visible("#auth-panel")
        page.fill("#token-input", "browser-secret")
        page.click("#token-submit")
        page.wait_for_selector("#model-info[data-variant='detection']")
        assert page.is_hidden("#auth-panel")
        _load_study(page, dicom_files, 10)
        soft = _canvas_stats(page)
        assert soft["std"] > 10
        assert page.get_attribute("#slice-canvas", "data-window") == "soft_tissue"
        # Another window re-renders the same slice.
        page.select_option("#window-select", "lung")
        page.wait_for_selector("#slice-canvas[data-window='lung']")
        assert page.get_attribute("#slice-canvas", "data-slice-index") == "10"
        assert _canvas_stats(page)["hash"] != soft["hash"]
        _save_screenshot(page, tmp_path, "viewer-token.png")


def test_viewer_draws_segmentation_masks(
    page: Any, segmentation_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    # Deterministic answer "The <seg>liver</seg> is normal." with a rectangular mask over
    # rows/cols 30-60 % of the slice (see GroundTruthPredictor).
    app = create_app(GroundTruthPredictor(segmentation_predictor))
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='segmentation']")
        _load_study(page, dicom_files, 10)
        inside, outside = (230, 230), (100, 100)
        before = [_canvas_pixels(page, *p) for p in (inside, outside)]
        page.select_option("#task-select", "segment")
        assert page.is_visible("#structures-input")
        page.fill("#structures-input", "liver")
        page.fill("#max-tokens-input", "4")
        page.click("#run-button")
        page.wait_for_selector("#slice-canvas[data-masks='1']")
        assert page.text_content("#report .phrase") == "liver"
        after = [_canvas_pixels(page, *p) for p in (inside, outside)]
        assert after[1] == before[1]
        tinted = after[0][:3]
        color = class_color(5)
        # Blended towards the class colour: closer to it than the bare slice was.
        dist = [sum(abs(a - c) for a, c in zip(px[:3], color, strict=True)) for px in before]
        assert sum(abs(a - c) for a, c in zip(tinted, color, strict=True)) < dist[0]
        page.mouse.move(1, 1)
        canvas = page.locator("#slice-canvas").bounding_box()
        scale = canvas["width"] / 512
        page.mouse.move(canvas["x"] + inside[0] * scale, canvas["y"] + inside[1] * scale)
        page.wait_for_selector("#report .phrase[data-active='true']")
        _save_screenshot(page, tmp_path, "viewer-segmentation.png")
