"""The web viewer in a real browser: Debian's Chromium driven by Playwright against the app
served by uvicorn on 127.0.0.1.

Run with ``pytest -m browser``. Without a Chromium binary the tests skip, except in CI (the
``CI`` environment variable set), where a missing browser is a failure.

Every test also checks that the page raised no JavaScript error and no Content-Security-
Policy violation (the server forbids inline scripts and styles).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from radgrounder.serve import create_app
from radgrounder.visualize import class_color
from tests.serve.conftest import NIFTI, REPO, GroundTruthPredictor, live_server

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
TIMEOUT_MS = 30_000
MR_NIFTI = REPO / "data" / "totalseg_example" / "example_mr_sm.nii.gz"
LIVER = class_color(5)

# Recorded in every page before its own scripts run: CSP violations the browser reports.
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


class SlowPredictor(GroundTruthPredictor):
    """The fixed grounded answer, but every ``run`` call takes ``delay_s`` seconds first (cut
    short when the server's ``should_stop`` says every client of the batch has gone)."""

    def __init__(self, real: Any, delay_s: float = 1.5) -> None:
        super().__init__(real)
        self.delay_s = delay_s

    def run(self, items: list[Any], max_new_tokens: int = 200, **kwargs: Any) -> list[Any]:
        should_stop = kwargs.get("should_stop")
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            if should_stop is not None and should_stop():
                break
            time.sleep(0.05)
        return super().run(items, max_new_tokens=max_new_tokens, **kwargs)


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
    context.add_init_script(CSP_LISTENER)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    csp_console: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: csp_console.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    violations: list[str] = []
    if not page.is_closed() and page.url.startswith("http"):
        violations = page.evaluate("() => window.__cspViolations || []")
    context.close()
    assert not errors, f"JavaScript errors in the viewer: {errors}"
    assert not violations and not csp_console, f"CSP violations: {violations} {csp_console}"


# -- helpers ---------------------------------------------------------------------------------


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


def _canvas_pixels(page: Any, x: float, y: float) -> list[int]:
    """RGBA of the canvas pixel (x, y) (canvas pixels, not image pixels)."""
    return page.evaluate(
        """([x, y]) => Array.from(document.getElementById('slice-canvas')
            .getContext('2d').getImageData(x, y, 1, 1).data)""",
        [round(x), round(y)],
    )


def _close(pixel: list[int], color: tuple[int, int, int], tol: int = 2) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel[:3], color, strict=True))


def _canvas_stats(page: Any) -> dict[str, float]:
    """Mean and spread of the canvas' grey values and a checksum, to tell images apart."""
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


def _view(page: Any) -> dict[str, float]:
    """The image -> canvas transform: canvas = image * scale + (ox, oy)."""
    return json.loads(page.get_attribute("#slice-canvas", "data-view"))


def _to_canvas(page: Any, x: float, y: float) -> tuple[float, float]:
    v = _view(page)
    return v["ox"] + x * v["scale"], v["oy"] + y * v["scale"]


def _to_screen(page: Any, cx: float, cy: float) -> tuple[float, float]:
    """Canvas pixels -> page coordinates for the mouse."""
    box = page.locator("#slice-canvas").bounding_box()
    width = page.evaluate("() => document.getElementById('slice-canvas').width")
    f = box["width"] / width
    return box["x"] + cx * f, box["y"] + cy * f


def _boxes(page: Any) -> list[dict[str, Any]]:
    return json.loads(page.get_attribute("#slice-canvas", "data-boxes"))


def _load_study(page: Any, files: list[Path], expected_index: int) -> None:
    page.set_input_files("#file-input", [str(p) for p in files])
    page.wait_for_selector(f"#slice-canvas[data-slice-index='{expected_index}']")


class _Requests(list):
    """Every request the page sends (method, path, headers), and how many are pending."""

    def __init__(self, page: Any) -> None:
        super().__init__()
        self.pending: set[Any] = set()
        page.on("request", self._sent)
        page.on("requestfinished", lambda r: self.pending.discard(r))
        page.on("requestfailed", lambda r: self.pending.discard(r))

    def _sent(self, request: Any) -> None:
        path = "/" + request.url.split("/", 3)[-1] if request.url.startswith("http") else ""
        self.append({"method": request.method, "path": path, "headers": request.headers})
        self.pending.add(request)

    def settle(self, page: Any, quiet_ms: int = 400) -> None:
        """Wait until nothing has been pending for ``quiet_ms`` (e.g. slice prefetching)."""
        deadline = time.monotonic() + 20
        quiet_since = None
        while time.monotonic() < deadline:
            page.wait_for_timeout(50)
            if self.pending:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_ms / 1000:
                return
        raise AssertionError(f"requests still pending: {[r.url for r in self.pending]}")


def _track(page: Any) -> _Requests:
    return _Requests(page)


def _api_calls(seen: list[dict[str, Any]], part: str, method: str | None = None) -> list[Any]:
    """The requests whose path contains ``part`` (ends with it, for a trailing "$")."""
    if part.endswith("$"):
        match = [r for r in seen if r["path"].split("?")[0].endswith(part[:-1])]
    else:
        match = [r for r in seen if part in r["path"]]
    return [r for r in match if method is None or r["method"] == method]


def _drop_files(page: Any, target: str, files: list[tuple[str, bytes, str]]) -> None:
    """Drop files on ``target`` as a user dragging them from the desktop would."""
    payload = [{"name": n, "data": list(d), "type": t} for n, d, t in files]
    page.evaluate(
        """([selector, files]) => {
            const dt = new DataTransfer();
            for (const f of files) {
                dt.items.add(new File([new Uint8Array(f.data)], f.name, {type: f.type}));
            }
            const target = document.querySelector(selector);
            for (const type of ['dragenter', 'dragover', 'drop']) {
                target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true,
                                                          dataTransfer: dt}));
            }
        }""",
        [target, payload],
    )


def _wait_text(page: Any, selector: str, text: str) -> None:
    """Wait until ``selector``'s text contains ``text`` (a function, not a string to
    evaluate: the page's CSP forbids eval)."""
    page.wait_for_function(
        "([s, t]) => (document.querySelector(s).textContent || '').includes(t)",
        arg=[selector, text],
    )


def _study_status(url: str, study_id: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/v1/studies/{study_id}", headers=headers, timeout=10).status_code


def _run_and_wait(page: Any) -> None:
    page.click("#run-button")
    page.wait_for_selector("#status[data-state='done']")


# -- tests -------------------------------------------------------------------------------------


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
        response = page.goto(url)
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector("#model-info[data-variant='detection']")
        assert page.input_value("#task-select") == "grounded-report"
        # Readable labels; the values stay the API names.
        tasks = page.eval_on_selector_all(
            "#task-select option", "os => os.map(o => [o.value, o.textContent])"
        )
        assert tasks == [
            ["report", "Report"],
            ["grounded-report", "Grounded report"],
            ["vqa", "Question (VQA)"],
            ["detect", "Find structures (boxes)"],
        ]
        languages = page.eval_on_selector_all(
            "#language-select option", "os => os.map(o => [o.value, o.textContent])"
        )
        assert languages == [["en", "English"], ["de", "Deutsch"]]

        # A damaged upload shows the server's message and leaves the page usable.
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(dicom_files[0].read_bytes()[:700])
        page.set_input_files("#file-input", [str(broken)])
        page.wait_for_selector("#error:not([hidden])")
        assert "cannot read the scan" in page.text_content("#error")

        _load_study(page, dicom_files, 10)
        assert page.is_hidden("#error")
        study_id = page.get_attribute("#slice-canvas", "data-study-id")
        meta = httpx.get(f"{url}/v1/studies/{study_id}", timeout=10).json()
        assert meta["position_axis"] == "S"
        mm = f"{meta['slice_positions_mm'][10]:.1f}".replace("-", "\u2212")
        label = page.text_content("#slice-label")
        assert label == f"slice 11 / 20 · S {mm} mm"
        # Orientation markers of the axial CT, radiological convention.
        edges = {e: page.text_content(f"#orient-{e}") for e in ("left", "right", "top", "bottom")}
        assert edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
        assert all(page.is_visible(f"#orient-{e}") for e in edges)
        stats = _canvas_stats(page)
        assert stats["std"] > 10, f"the slice canvas looks blank: {stats}"

        # Scroll: mouse wheel over the canvas, then the slider.
        page.hover("#slice-canvas")
        page.mouse.wheel(0, 120)
        page.wait_for_selector("#slice-canvas[data-slice-index='11']")
        assert page.text_content("#slice-label") != label  # another position
        page.fill("#slice-slider", "4")
        page.wait_for_selector("#slice-canvas[data-slice-index='4']")
        assert _canvas_stats(page)["hash"] != stats["hash"]

        page.fill("#max-tokens-input", "4")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        phrases = page.locator("#report .phrase")
        assert phrases.count() == 1
        assert phrases.first.text_content() == "liver"
        # The phrase carries its number, the same number labels its box.
        assert page.text_content("#report .ref") == "[1]"
        assert "The liver[1] is normal." in page.text_content("#report")
        assert page.text_content("#legend") == "liver"
        assert "Grounded report · English · slice 5" in page.text_content("#result-meta")

        # The box is drawn in the class colour, with its number label.
        (box,) = _boxes(page)
        assert box["color"] == "#{:02x}{:02x}{:02x}".format(*LIVER)
        assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (100, 120, 300, 320)
        assert box["ref"] == 1 and box["label"]["text"] == "1"
        cx1, cy1 = _to_canvas(page, 100, 120)
        cx2, cy2 = _to_canvas(page, 300, 320)
        mid_x, mid_y = (cx1 + cx2) / 2, (cy1 + cy2) / 2
        for x, y in ((box["cx1"], mid_y), (mid_x, box["cy2"]), (box["cx2"] - 1, mid_y)):
            pixel = _canvas_pixels(page, x, y)
            assert _close(pixel, LIVER), (x, y, pixel)
        tag = box["label"]
        assert _close(_canvas_pixels(page, tag["x"] + 1, tag["y"] + 1), LIVER)

        # Hovering the phrase highlights its box; hovering the box highlights the phrase.
        thin = box["line"]
        phrases.first.hover()
        page.wait_for_selector("#slice-canvas[data-highlight='0']")
        assert phrases.first.get_attribute("data-active") == "true"
        assert page.get_attribute("#report .ref", "data-active") == "true"
        assert page.get_attribute("#legend li", "data-active") == "true"
        (active,) = _boxes(page)
        assert active["line"] > thin and active["label"]["text"] == "1 liver"
        page.mouse.move(5, 5)
        page.wait_for_selector("#slice-canvas[data-highlight='']")
        assert phrases.first.get_attribute("data-active") == "false"
        page.mouse.move(*_to_screen(page, mid_x, mid_y))
        page.wait_for_selector("#report .phrase[data-active='true']")
        assert page.get_attribute("#slice-canvas", "data-highlight") == "0"
        # A click on the phrase pins the highlight; it stays when the pointer leaves.
        phrases.first.click()
        page.mouse.move(5, 5)
        assert page.get_attribute("#slice-canvas", "data-highlight") == "0"
        assert phrases.first.get_attribute("data-active") == "true"
        phrases.first.click()
        page.mouse.move(5, 5)
        page.wait_for_selector("#slice-canvas[data-highlight='']")
        page.mouse.move(*_to_screen(page, mid_x, mid_y))
        page.wait_for_selector("#report .phrase[data-active='true']")
        shot = _save_screenshot(page, tmp_path, "viewer-grounded.png")
        assert shot.stat().st_size > 10_000

        # The raw response can be downloaded.
        with page.expect_download() as info:
            page.click("#download-json")
        saved = json.loads(Path(info.value.path()).read_text())
        assert saved["predictions"][0]["spans"][0]["class_id"] == 5
        assert saved["predictions"][0]["slice_index"] == 4

        # Results belong to their slice; other slices show none.
        page.fill("#slice-slider", "7")
        page.wait_for_selector("#slice-canvas[data-slice-index='7']")
        assert page.get_attribute("#report", "data-state") == "empty"
        assert "No result for this slice yet" in page.text_content("#report")
        assert _boxes(page) == []
        page.click("[data-goto-slice='4']")
        page.wait_for_selector("#report[data-state='result']")

        # German: all slices, legend with German display names.
        page.select_option("#language-select", "de")
        page.check("#scope-all")
        _run_and_wait(page)
        assert "20 prediction(s)" in page.text_content("#status")
        assert page.text_content("#legend") == "Leber"
        assert page.text_content("#progress-label") == "20 / 20"
        page.fill("#slice-slider", "17")
        page.wait_for_selector("#slice-canvas[data-slice-index='17']")
        assert page.get_attribute("#report", "data-state") == "result"
        with page.expect_download() as info:
            page.click("#download-json")
        saved = json.loads(Path(info.value.path()).read_text())
        assert len(saved["predictions"]) == 20 and len(saved["request_ids"]) == 20


def test_failed_upload_clears_the_previous_study(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    app = create_app(GroundTruthPredictor(detection_predictor))
    with live_server(app) as url:
        seen = _track(page)
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        first_id = page.get_attribute("#slice-canvas", "data-study-id")
        page.fill("#max-tokens-input", "4")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        assert page.is_enabled("#run-button")

        garbage = tmp_path / "garbage.bin"
        garbage.write_bytes(os.urandom(4096))
        page.set_input_files("#file-input", [str(garbage)])
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error").strip()
        # Nothing of the previous study is left: image, result, boxes, Run.
        assert page.get_attribute("#slice-canvas", "data-slice-index") == "-1"
        assert page.get_attribute("#slice-canvas", "data-study-id") == ""
        assert page.is_hidden("#slice-canvas")
        assert page.get_attribute("#report", "data-state") == "empty"
        assert "liver" not in page.text_content("#report")
        assert _boxes(page) == []
        assert page.is_disabled("#run-button")
        assert page.is_disabled("#download-json")
        assert page.text_content("#slice-label") == "–"
        # The old study was deleted on the server, and Run sends nothing.
        assert _study_status(url, first_id) == 404
        n_predict = len(_api_calls(seen, "/predict"))
        page.click("#run-button", force=True)
        page.keyboard.press("Enter")
        page.wait_for_timeout(300)
        assert len(_api_calls(seen, "/predict")) == n_predict

        # A good study afterwards works again.
        _load_study(page, dicom_files, 10)
        assert page.is_hidden("#error")
        assert page.is_enabled("#run-button")
        assert page.get_attribute("#slice-canvas", "data-study-id") not in ("", first_id)


def test_window_level_presets_and_drag_without_requests(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    app = create_app(detection_predictor)
    with live_server(app) as url:
        seen = _track(page)
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        options = page.eval_on_selector_all(
            "#window-select option", "os => os.map(o => [o.value, o.textContent])"
        )
        assert ["soft_tissue", "Soft tissue (W 400 / L 40)"] in options
        assert ["lung", "Lung (W 1500 / L −600)"] in options
        canvas = "#slice-canvas"
        assert page.get_attribute(canvas, "data-window") == "soft_tissue"
        assert page.get_attribute(canvas, "data-window-width") == "400"
        assert page.get_attribute(canvas, "data-window-level") == "40"
        assert page.text_content("#wl-readout") == "W 400 / L 40"
        soft = _canvas_stats(page)
        # Let the neighbour prefetch finish, then no request may follow a window change.
        seen.settle(page)
        before = len(seen)

        page.select_option("#window-select", "lung")
        page.wait_for_selector(f"{canvas}[data-window='lung'][data-window-width='1500']")
        assert page.get_attribute(canvas, "data-window-level") == "-600"
        assert page.get_attribute(canvas, "data-slice-index") == "10"
        lung = _canvas_stats(page)
        assert lung["hash"] != soft["hash"]
        page.select_option("#window-select", "soft_tissue")
        page.wait_for_selector(f"{canvas}[data-window-width='400']")
        assert _canvas_stats(page)["hash"] == soft["hash"]

        # Right-button drag: right = wider, down = higher level.
        box = page.locator(canvas).bounding_box()
        x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x0, y0)
        page.mouse.down(button="right")
        page.mouse.move(x0 + 60, y0 + 30, steps=5)
        page.mouse.up(button="right")
        width = float(page.get_attribute(canvas, "data-window-width"))
        level = float(page.get_attribute(canvas, "data-window-level"))
        assert width > 400 and level > 40, (width, level)
        dragged = _canvas_stats(page)
        assert dragged["hash"] != soft["hash"]
        readout = page.text_content("#wl-readout")
        assert readout.startswith(f"W {round(width)} / L {round(level)}"), readout
        assert page.is_enabled("#wl-reset")

        # Shift + left drag does the same; up and left narrow the window and lower the level.
        page.keyboard.down("Shift")
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 - 100, y0 - 80, steps=5)
        page.mouse.up()
        page.keyboard.up("Shift")
        assert float(page.get_attribute(canvas, "data-window-width")) < width
        assert float(page.get_attribute(canvas, "data-window-level")) < level
        assert page.get_attribute(canvas, "data-zoom") == "1"  # the drag did not pan/zoom

        # Reset returns to the preset and its exact image.
        page.click("#wl-reset")
        assert page.get_attribute(canvas, "data-window-width") == "400"
        assert page.get_attribute(canvas, "data-window-level") == "40"
        assert _canvas_stats(page)["hash"] == soft["hash"]
        assert page.is_disabled("#wl-reset")
        assert seen[before:] == [], f"window/level sent requests: {seen[before:]}"
        _save_screenshot(page, tmp_path, "viewer-window.png")


def test_zoom_and_pan_keep_boxes_aligned(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    app = create_app(GroundTruthPredictor(detection_predictor))
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        page.fill("#max-tokens-input", "4")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        fit = _view(page)

        def box_edges_drawn() -> None:
            """The box outline is where the image -> canvas transform puts (100..300,
            120..320), and the phrase lights up over the transformed box centre."""
            (box,) = _boxes(page)
            cx1, cy1 = _to_canvas(page, 100, 120)
            cx2, cy2 = _to_canvas(page, 300, 320)
            assert abs(box["cx1"] - cx1) <= 1 and abs(box["cy2"] - cy2) <= 1
            mid_x, mid_y = (cx1 + cx2) / 2, (cy1 + cy2) / 2
            for x, y in ((round(cx1), mid_y), (mid_x, round(cy2)), (round(cx2) - 1, mid_y)):
                assert _close(_canvas_pixels(page, x, y), LIVER), (x, y)
            # Just inside the outline is anatomy, not the outline colour.
            assert not _close(_canvas_pixels(page, round(cx1) + 8, mid_y), LIVER, tol=30)
            page.mouse.move(5, 5)
            page.wait_for_selector("#slice-canvas[data-highlight='']")
            page.mouse.move(*_to_screen(page, mid_x, mid_y))
            page.wait_for_selector("#slice-canvas[data-highlight='0']")
            page.mouse.move(5, 5)

        box_edges_drawn()

        # Buttons: two steps in.
        page.click("#zoom-in")
        page.click("#zoom-in")
        zoom = float(page.get_attribute("#slice-canvas", "data-zoom"))
        assert zoom == pytest.approx(1.5625)
        assert _view(page)["scale"] == pytest.approx(fit["scale"] * zoom)
        assert page.text_content("#zoom-readout") == "zoom 156 %"
        box_edges_drawn()

        # Ctrl+wheel zooms about the pointer: the image point under it stays put.
        cx, cy = _to_canvas(page, 150, 150)
        page.mouse.move(*_to_screen(page, cx, cy))
        page.keyboard.down("Control")
        page.mouse.wheel(0, -100)
        page.keyboard.up("Control")
        page.wait_for_function(
            "() => Number(document.getElementById('slice-canvas').dataset.zoom) > 1.6"
        )
        assert page.get_attribute("#slice-canvas", "data-slice-index") == "10"  # no scroll
        v = _view(page)
        assert v["ox"] + 150 * v["scale"] == pytest.approx(cx, abs=1.5)
        box_edges_drawn()

        # Left drag pans when zoomed.
        before = _view(page)
        sx, sy = _to_screen(page, 40, 40)
        page.mouse.move(sx, sy)
        page.mouse.down()
        page.mouse.move(sx + 70, sy + 40, steps=5)
        page.mouse.up()
        after = _view(page)
        assert after["ox"] - before["ox"] == pytest.approx(70, abs=2)
        assert after["oy"] - before["oy"] == pytest.approx(40, abs=2)
        box_edges_drawn()
        _save_screenshot(page, tmp_path, "viewer-zoomed.png")

        page.click("#zoom-fit")
        assert page.get_attribute("#slice-canvas", "data-zoom") == "1"
        assert _view(page)["ox"] == pytest.approx(fit["ox"])
        page.click("#zoom-out")
        assert float(page.get_attribute("#slice-canvas", "data-zoom")) < 1
        box_edges_drawn()


def test_drag_and_drop_mr_and_photo(page: Any, detection_predictor: Any, tmp_path: Path) -> None:
    app = create_app(detection_predictor)
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        # An MR NIfTI dropped on the image area: float pixels, an "auto" window.
        _drop_files(page, "#canvas-wrap", [(MR_NIFTI.name, MR_NIFTI.read_bytes(), "")])
        page.wait_for_selector("#slice-canvas[data-slice-index='10']")
        assert page.text_content("#slice-label").startswith("slice 11 / 20 · ")
        (option,) = page.eval_on_selector_all("#window-select option", "os => os.map(o => o.text)")
        assert option.startswith("Auto (1–99 %) (W ") and " / L " in option, option
        assert page.get_attribute("#slice-canvas", "data-window") == "auto"
        assert all(page.is_visible(f"#orient-{e}") for e in ("left", "right", "top", "bottom"))
        assert _canvas_stats(page)["std"] > 10
        mr_id = page.get_attribute("#slice-canvas", "data-study-id")

        # A photo dropped on the drop zone: RGB as is, no orientation, no window.
        rgb = np.zeros((64, 96, 3), np.uint8)
        rgb[:, :48] = (200, 30, 30)
        rgb[:, 48:] = (20, 160, 40)
        photo = tmp_path / "photo.png"
        Image.fromarray(rgb).save(photo)
        _drop_files(page, "#drop-zone", [("photo.png", photo.read_bytes(), "image/png")])
        page.wait_for_function(
            """(old) => { const d = document.getElementById('slice-canvas').dataset;
                return d.studyId && d.studyId !== old && d.sliceIndex === '0'; }""",
            arg=mr_id,
        )
        assert page.text_content("#slice-label") == "slice 1 / 1"
        assert all(page.is_hidden(f"#orient-{e}") for e in ("left", "right", "top", "bottom"))
        assert page.is_disabled("#window-select")
        assert page.text_content("#wl-readout") == "RGB"
        red = _canvas_pixels(page, *_to_canvas(page, 10, 32))
        green = _canvas_pixels(page, *_to_canvas(page, 80, 32))
        assert _close(red, (200, 30, 30)) and _close(green, (20, 160, 40)), (red, green)
        # The MR study was deleted when the photo replaced it.
        assert _study_status(url, mr_id) == 404
        _save_screenshot(page, tmp_path, "viewer-photo.png")


def test_run_all_slices_progress_and_cancel(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    app = create_app(SlowPredictor(detection_predictor, delay_s=1.5))
    with live_server(app) as url:
        seen = _track(page)
        aborted: list[str] = []
        page.on("requestfailed", lambda r: aborted.append(r.url) if "/predict" in r.url else None)
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        page.fill("#max-tokens-input", "2")
        page.check("#scope-all")
        page.click("#run-button")
        page.wait_for_selector("#run-progress:not([hidden])")
        assert page.is_visible("#cancel-button")
        assert page.is_disabled("#run-button")
        assert page.get_attribute("#progress", "max") == "20"
        page.wait_for_function("() => document.getElementById('progress').value >= 2")
        label = page.text_content("#progress-label")
        assert label in ("2 / 20", "3 / 20"), label
        # One request per slice, in order.
        paths = [r["path"] for r in _api_calls(seen, "/predict", "POST")]
        assert all(p.endswith("/predict") for p in paths) and len(paths) >= 2

        page.wait_for_timeout(300)  # the next slice's request is in flight (1.5 s each)
        page.click("#cancel-button")
        page.wait_for_selector("#status[data-state='cancelled']")
        done = int(page.get_attribute("#progress", "value"))
        assert 2 <= done < 20
        assert page.is_hidden("#cancel-button")
        assert page.is_enabled("#run-button")
        assert aborted, "the in-flight request was not aborted"
        sent = len(_api_calls(seen, "/predict", "POST"))
        assert sent == done + 1  # the aborted one; then the loop stopped
        page.wait_for_timeout(2000)
        assert len(_api_calls(seen, "/predict", "POST")) == sent
        assert int(page.get_attribute("#progress", "value")) == done
        assert f"Cancelled after {done} / 20" in page.text_content("#status")

        # What arrived stays, per slice.
        page.fill("#slice-slider", "0")
        page.wait_for_selector("#slice-canvas[data-slice-index='0']")
        page.wait_for_selector("#report[data-state='result']")
        assert page.text_content("#report .phrase") == "liver"
        page.fill("#slice-slider", "15")
        page.wait_for_selector("#slice-canvas[data-slice-index='15']")
        assert page.get_attribute("#report", "data-state") == "empty"
        assert "No result for this slice yet" in page.text_content("#report")
        _save_screenshot(page, tmp_path, "viewer-cancelled.png")


def test_single_run_shows_busy_time_and_cancels(
    page: Any, detection_predictor: Any, dicom_files: list[Path]
) -> None:
    app = create_app(SlowPredictor(detection_predictor, delay_s=1.5))
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        page.fill("#max-tokens-input", "2")
        page.click("#run-button")
        page.wait_for_selector("#status[data-state='busy']")
        assert page.get_attribute("body", "data-busy") == "true"
        assert page.is_visible("#cancel-button") and page.is_visible("#elapsed")
        assert page.is_hidden("#run-progress")  # one slice: no progress bar
        page.wait_for_function("() => Number(document.getElementById('elapsed').dataset.ms) > 400")
        assert page.text_content("#elapsed").endswith(" s")
        page.click("#cancel-button")
        page.wait_for_selector("#status[data-state='cancelled']")
        assert page.get_attribute("#report", "data-state") == "empty"
        assert page.get_attribute("body", "data-busy") == "false"

        # A run left alone finishes and shows its time.
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        assert float(page.get_attribute("#elapsed", "data-ms")) >= 1400
        assert "Done: 1 prediction(s)" in page.text_content("#status")


def test_empty_answer_and_server_errors(
    page: Any, detection_predictor: Any, dicom_files: list[Path]
) -> None:
    empty = GroundTruthPredictor(detection_predictor)
    empty.markup = ""  # the model "says" nothing
    app = create_app(empty)
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        page.fill("#max-tokens-input", "2")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-empty='true']")
        assert page.text_content("#report") == "The model returned no text for this slice."
        assert page.is_visible("#report #empty-answer")

        # A prompt that is too long: the server's 422 names the field.
        page.select_option("#task-select", "vqa")
        page.fill("#question-input", "Is there a lesion? " * 1100)
        page.click("#run-button")
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error").startswith("question")
        assert "too long" in page.text_content("#error")
        assert page.is_enabled("#run-button")

        # A full queue: 503 with Retry-After.
        page.route(
            "**/predict",
            lambda route: route.fulfill(
                status=503,
                headers={"Retry-After": "7", "Content-Type": "application/json"},
                body=json.dumps({"detail": "server busy: the model queue is full"}),
            ),
        )
        page.fill("#question-input", "Is there a lesion?")
        page.click("#run-button")
        _wait_text(page, "#error", "server busy, retry in 7 s")
        page.unroute("**/predict")
        page.route(
            "**/predict",
            lambda route: route.fulfill(
                status=504,
                headers={"Content-Type": "application/json"},
                body=json.dumps({"detail": "not answered within 60 s"}),
            ),
        )
        page.click("#run-button")
        _wait_text(page, "#error", "deadline")
        assert "not answered within 60 s" in page.text_content("#error")


def test_expired_study_is_uploaded_again_and_deleted_on_leave(
    page: Any, detection_predictor: Any, dicom_files: list[Path]
) -> None:
    app = create_app(GroundTruthPredictor(detection_predictor))
    with live_server(app) as url:
        seen = _track(page)
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        first_id = page.get_attribute("#slice-canvas", "data-study-id")
        assert len(_api_calls(seen, "/v1/studies$", "POST")) == 1

        # The server forgets the study (expiry, restart): Run uploads it again, once.
        assert httpx.delete(f"{url}/v1/studies/{first_id}", timeout=10).status_code == 204
        page.fill("#max-tokens-input", "4")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        second_id = page.get_attribute("#slice-canvas", "data-study-id")
        assert second_id not in (first_id, "")
        assert len(_api_calls(seen, "/v1/studies$", "POST")) == 2
        assert _study_status(url, second_id) == 200

        # Also for pixels: a slice not fetched yet comes from the re-uploaded study.
        assert httpx.delete(f"{url}/v1/studies/{second_id}", timeout=10).status_code == 204
        page.fill("#slice-slider", "0")
        page.wait_for_selector("#slice-canvas[data-slice-index='0']")
        third_id = page.get_attribute("#slice-canvas", "data-study-id")
        assert third_id not in (first_id, second_id, "")
        assert len(_api_calls(seen, "/v1/studies$", "POST")) == 3
        assert _canvas_stats(page)["std"] > 10

        # Leaving the page deletes the study (fetch keepalive on pagehide).
        page.goto("about:blank")
        deadline = time.monotonic() + 10
        while _study_status(url, third_id) != 404:
            assert time.monotonic() < deadline, "the study was not deleted on pagehide"
            time.sleep(0.1)


@pytest.mark.parametrize("viewport", [(1000, 700), (1280, 720)])
def test_layout_shows_the_image_without_scrolling(
    page: Any,
    detection_predictor: Any,
    dicom_files: list[Path],
    tmp_path: Path,
    viewport: tuple[int, int],
) -> None:
    width, height = viewport
    app = create_app(GroundTruthPredictor(detection_predictor))
    with live_server(app) as url:
        page.set_viewport_size({"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='detection']")
        _load_study(page, dicom_files, 10)
        page.fill("#max-tokens-input", "4")
        _run_and_wait(page)
        page.wait_for_selector("#report[data-state='result']")
        assert page.evaluate("() => window.scrollY") == 0
        canvas = page.locator("#slice-canvas").bounding_box()
        assert 0 <= canvas["y"] < height and canvas["y"] + canvas["height"] <= height
        assert canvas["height"] >= 300 and canvas["width"] >= 300, canvas
        # The image itself (not only the canvas element) fills most of the view.
        v = _view(page)
        assert 512 * v["scale"] >= 300
        # Slider, toolbar and Run are on screen too.
        for selector in ("#slice-slider", "#window-select", "#zoom-in", "#run-button"):
            box = page.locator(selector).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= height, selector
        _save_screenshot(page, tmp_path, f"viewer-layout-{width}x{height}.png")


def test_viewer_asks_for_the_token(
    page: Any, detection_predictor: Any, dicom_files: list[Path], tmp_path: Path
) -> None:
    token = "browser-secret"
    app = create_app(detection_predictor, token=token)
    with live_server(app) as url:
        seen = _track(page)
        page.goto(url)
        page.wait_for_selector("#auth-panel:not([hidden])")
        assert page.get_attribute("#model-info", "data-variant") == ""
        page.fill("#token-input", "wrong")
        page.click("#token-submit")
        _wait_text(page, "#auth-message", "not accepted")
        assert page.is_visible("#auth-panel")
        page.fill("#token-input", token)
        page.click("#token-submit")
        page.wait_for_selector("#model-info[data-variant='detection']")
        assert page.is_hidden("#auth-panel")
        assert page.evaluate("() => sessionStorage.getItem('radgrounder-token')") == token
        _load_study(page, dicom_files, 10)
        assert _canvas_stats(page)["std"] > 10
        seen.settle(page)

        # Asked once: a reload takes the token from sessionStorage.
        page.reload()
        page.wait_for_selector("#model-info[data-variant='detection']")
        assert page.is_hidden("#auth-panel")
        _load_study(page, dicom_files, 10)
        seen.settle(page)
        calls = [r for r in seen if r["path"].startswith("/v1/")]
        kinds = {(r["method"], r["path"].split("/")[2]) for r in calls}
        assert {("GET", "model"), ("POST", "studies"), ("GET", "studies")} <= kinds
        answered = calls[2:]  # after the two unauthenticated model calls and the wrong token
        assert answered and all(
            r["headers"].get("authorization") == f"Bearer {token}" for r in answered
        ), [(r["method"], r["path"], r["headers"].get("authorization")) for r in answered]

        # "API docs" opens /docs, which loads without the token (Swagger's Authorize).
        assert page.get_attribute("#docs-link", "href") == "/docs"
        docs = httpx.get(f"{url}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/model", timeout=10).status_code == 401
        with page.context.expect_page() as popup_info:
            page.click("#docs-link")
        popup = popup_info.value
        popup.wait_for_load_state("domcontentloaded")
        assert popup.url == f"{url}/docs"
        assert "application/json" not in popup.evaluate("() => document.contentType")
        popup.close()
        _save_screenshot(page, tmp_path, "viewer-token.png")


def test_viewer_draws_segmentation_masks(
    page: Any, segmentation_predictor: Any, tmp_path: Path
) -> None:
    # Deterministic answer "The <seg>liver</seg> is normal." with a rectangular mask over
    # rows/cols 30-60 % of the slice (see GroundTruthPredictor).
    app = create_app(GroundTruthPredictor(segmentation_predictor))
    with live_server(app) as url:
        page.goto(url)
        page.wait_for_selector("#model-info[data-variant='segmentation']")
        page.set_input_files("#file-input", [str(NIFTI)])
        page.wait_for_function(
            "() => document.getElementById('slice-canvas').dataset.sliceIndex !== '-1'"
        )
        meta = httpx.get(
            f"{url}/v1/studies/{page.get_attribute('#slice-canvas', 'data-study-id')}",
            timeout=10,
        ).json()
        w, h = meta["width"], meta["height"]
        inside = _to_canvas(page, 0.45 * w, 0.45 * h)
        outside = _to_canvas(page, 0.1 * w, 0.1 * h)
        before = [_canvas_pixels(page, *p) for p in (inside, outside)]
        page.select_option("#task-select", "segment")
        assert page.is_visible("#structures-input")
        page.fill("#structures-input", "liver")
        page.fill("#max-tokens-input", "4")
        page.click("#run-button")
        page.wait_for_selector("#slice-canvas[data-masks='1']")
        assert page.text_content("#report .phrase") == "liver"
        assert page.text_content("#report .ref") == "[1]"
        after = [_canvas_pixels(page, *p) for p in (inside, outside)]
        assert after[1] == before[1]
        # Blended towards the class colour: closer to it than the bare slice was.
        dist = [sum(abs(a - c) for a, c in zip(px[:3], LIVER, strict=True)) for px in before]
        assert sum(abs(a - c) for a, c in zip(after[0][:3], LIVER, strict=True)) < dist[0]
        # The mask's number label sits at the mask's top-left corner.
        (label,) = json.loads(page.get_attribute("#slice-canvas", "data-mask-labels"))
        assert label["text"] == "1"
        corner = _to_canvas(page, int(0.3 * w), int(0.3 * h))
        assert abs(label["x"] - corner[0]) <= 2 and abs(label["y"] + label["h"] - corner[1]) <= 2
        assert _close(_canvas_pixels(page, label["x"] + 1, label["y"] + 1), LIVER)

        # Zoomed in, the mask stays on the anatomy and hovering it highlights the phrase.
        page.click("#zoom-in")
        page.click("#zoom-in")
        inside = _to_canvas(page, 0.45 * w, 0.45 * h)
        edge_in = _to_canvas(page, 0.3 * w + 1, 0.45 * h)
        edge_out = _to_canvas(page, 0.3 * w - 2, 0.45 * h)
        tinted = _canvas_pixels(page, *edge_in)
        bare = _canvas_pixels(page, *edge_out)
        d_in = sum(abs(a - c) for a, c in zip(tinted[:3], LIVER, strict=True))
        d_out = sum(abs(a - c) for a, c in zip(bare[:3], LIVER, strict=True))
        assert d_in < d_out, (tinted, bare)
        page.mouse.move(1, 1)
        page.mouse.move(*_to_screen(page, *inside))
        page.wait_for_selector("#report .phrase[data-active='true']")
        _save_screenshot(page, tmp_path, "viewer-segmentation.png")
