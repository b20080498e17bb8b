// RadGrounder viewer: upload a study once, scroll its slices (raw pixels, windowed here),
// zoom and pan, run the model per slice and show grounded phrases with their boxes and
// masks. Plain browser JavaScript, no dependencies, no build step; it runs under the
// server's Content-Security-Policy (no inline code or style attributes).
"use strict";

(() => {
  // -- constants ------------------------------------------------------------------------------

  const TASK_LABELS = {
    "grounded-report": "Grounded report",
    report: "Report",
    vqa: "Question (VQA)",
    detect: "Find structures (boxes)",
    segment: "Segment structures (masks)",
  };
  const LANGUAGE_LABELS = { en: "English", de: "Deutsch" };
  const WINDOW_LABELS = {
    soft_tissue: "Soft tissue",
    lung: "Lung",
    bone: "Bone",
    brain: "Brain",
    liver: "Liver",
    auto: "Auto (1–99 %)",
  };
  const TOKEN_KEY = "radgrounder-token";
  const CACHE_SLICES = 64; // decoded slices kept in memory
  const PREFETCH = [1, -1, 2, -2]; // neighbours fetched after the current slice
  const ZOOM_STEP = 1.25;
  const ZOOM_MIN = 0.25;
  const ZOOM_MAX = 16;
  const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

  // -- elements -------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = {
    modelInfo: $("model-info"),
    authPanel: $("auth-panel"),
    authForm: $("auth-form"),
    tokenInput: $("token-input"),
    authMessage: $("auth-message"),
    dropZone: $("drop-zone"),
    fileInput: $("file-input"),
    windowSelect: $("window-select"),
    wlReset: $("wl-reset"),
    zoomIn: $("zoom-in"),
    zoomOut: $("zoom-out"),
    zoomFit: $("zoom-fit"),
    wrap: $("canvas-wrap"),
    canvas: $("slice-canvas"),
    emptyHint: $("empty-hint"),
    orient: {
      top: $("orient-top"),
      bottom: $("orient-bottom"),
      left: $("orient-left"),
      right: $("orient-right"),
    },
    overlayInfo: $("overlay-info"),
    wlReadout: $("wl-readout"),
    zoomReadout: $("zoom-readout"),
    slider: $("slice-slider"),
    sliceLabel: $("slice-label"),
    taskSelect: $("task-select"),
    languageSelect: $("language-select"),
    questionInput: $("question-input"),
    structuresInput: $("structures-input"),
    clinicalInput: $("clinical-info-input"),
    clinicalQuestionInput: $("clinical-question-input"),
    scopeAll: $("scope-all"),
    maxTokens: $("max-tokens-input"),
    runButton: $("run-button"),
    cancelButton: $("cancel-button"),
    elapsed: $("elapsed"),
    runProgress: $("run-progress"),
    progress: $("progress"),
    progressLabel: $("progress-label"),
    status: $("status"),
    error: $("error"),
    resultMeta: $("result-meta"),
    report: $("report"),
    legend: $("legend"),
    problems: $("problems"),
    download: $("download-json"),
  };
  const ctx = el.canvas.getContext("2d");

  const state = {
    token: readStoredToken(),
    model: null,
    loading: false, // an upload is in flight
    gen: 0, // bumped whenever the study changes; late answers for an older one are dropped
    files: [], // the files of the loaded study (re-uploaded once if the server forgot it)
    study: null, // the server's study metadata
    cache: new Map(), // slice index -> {rows, cols, channels, values}; oldest first
    inflight: new Map(), // slice index -> Promise of the slice
    index: 0,
    sliceBitmap: null, // offscreen canvas: the current slice, windowed
    bitmapIndex: -1,
    window: null, // {name, center, width, presetCenter, presetWidth}
    view: { zoom: 1, panX: 0, panY: 0 }, // zoom relative to "fit", pan in canvas pixels
    bySlice: new Map(), // slice index -> prediction
    masks: new Map(), // "slice:span" -> {canvas, data, width, height, bbox}
    lastRun: null, // {request_ids, predictions} of the last run, for Download JSON
    run: null, // the run in progress: {controller, cancelled, timer}
    highlight: null, // span index
    pinned: null,
    drawnBoxes: [],
  };

  // -- small helpers --------------------------------------------------------------------------

  function readStoredToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null; // storage disabled
    }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // storage disabled: the token lives for this page only
    }
  }

  // A number for people: integers from 100 up, three significant digits below.
  function fmtNum(value) {
    if (!Number.isFinite(value)) return String(value);
    const text = Math.abs(value) >= 100 ? String(Math.round(value)) : String(Number(value.toPrecision(3)));
    return text.replace("-", "\u2212");
  }

  function windowLabel(name) {
    return WINDOW_LABELS[name] || name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
  }

  function sliceCount() {
    return state.study ? state.study.n_slices : 0;
  }

  // Thrown for answers that belong to a study the user has since replaced.
  class StaleError extends Error {}

  class ApiError extends Error {
    constructor(message, status, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  const isAbort = (err) => err && err.name === "AbortError";

  // -- API ------------------------------------------------------------------------------------

  let tokenWaiter = null;

  function askForToken(message) {
    el.authPanel.hidden = false;
    el.authMessage.textContent = message;
    el.tokenInput.focus();
    if (!tokenWaiter) {
      let resolve;
      const promise = new Promise((r) => { resolve = r; });
      tokenWaiter = { promise, resolve };
    }
    return tokenWaiter.promise;
  }

  el.authForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = el.tokenInput.value.trim();
    if (!token) return;
    state.token = token;
    storeToken(token);
    el.authPanel.hidden = true;
    el.authMessage.textContent = "";
    if (tokenWaiter) {
      tokenWaiter.resolve();
      tokenWaiter = null;
    }
  });

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    return headers;
  }

  // The server's message for a failed response: its JSON "detail", else the status line.
  async function errorOf(response) {
    let detail = null;
    try {
      detail = (await response.json()).detail;
    } catch (err) {
      detail = null;
    }
    let text = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : "";
    const retry = Number(response.headers.get("Retry-After"));
    const retryAfter = Number.isFinite(retry) && retry > 0 ? retry : null;
    if (response.status === 503) {
      text = `server busy, retry in ${retryAfter || "a few"} s${text ? ` (${text})` : ""}`;
    } else if (response.status === 504) {
      text = `the server gave up: the request deadline passed${text ? ` (${text})` : ""}`;
    }
    return new ApiError(text || `${response.status} ${response.statusText}`, response.status, retryAfter);
  }

  // fetch() with the bearer token; on 401 ask for a (new) token and try again. Returns the
  // Response when it is ok, throws ApiError otherwise (AbortError passes through).
  async function request(path, options = {}) {
    for (;;) {
      let response;
      try {
        response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
      } catch (err) {
        if (isAbort(err)) throw err;
        throw new ApiError(`cannot reach the server (${err.message})`, 0, null);
      }
      if (response.status === 401) {
        await response.text().catch(() => ""); // finish the response; it is not needed
        const hadToken = Boolean(state.token);
        state.token = null;
        storeToken(null);
        await askForToken(hadToken ? "The token was not accepted; try again." : "");
        continue;
      }
      if (!response.ok) throw await errorOf(response);
      return response;
    }
  }

  async function requestJson(path, options) {
    return (await request(path, options)).json();
  }

  // A request about the loaded study. When the server has forgotten it (404: expired or
  // restarted) the files are uploaded again, once, and the request repeated.
  async function studyRequest(pathOf, options) {
    const gen = state.gen;
    for (let attempt = 0; ; attempt += 1) {
      if (!state.study || gen !== state.gen) throw new StaleError("study replaced");
      try {
        const response = await request(pathOf(state.study.study_id), options);
        if (gen !== state.gen) throw new StaleError("study replaced");
        return response;
      } catch (err) {
        if (err instanceof ApiError && err.status === 404 && attempt === 0 && state.files.length) {
          await reupload(gen);
          continue;
        }
        throw err;
      }
    }
  }

  let reuploading = null;

  function reupload(gen) {
    if (!reuploading) {
      reuploading = (async () => {
        setStatus("busy", "The server no longer has the study; uploading it again…");
        const study = await uploadFiles(state.files);
        if (gen !== state.gen) throw new StaleError("study replaced");
        state.study = study;
        el.canvas.dataset.studyId = study.study_id;
        setStatus("idle", "");
      })().finally(() => { reuploading = null; });
    }
    return reuploading;
  }

  async function uploadFiles(files) {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    return requestJson("/v1/studies", { method: "POST", body: form });
  }

  // Tell the server it can drop a study (best effort; keepalive survives page unload).
  function deleteStudy(study) {
    if (!study) return;
    fetch(`/v1/studies/${encodeURIComponent(study.study_id)}`, {
      method: "DELETE",
      headers: authHeaders(),
      keepalive: true,
    }).catch(() => {});
  }

  // -- status line and errors -----------------------------------------------------------------

  function setStatus(kind, message) {
    el.status.dataset.state = kind;
    el.status.textContent = message || "";
    document.body.dataset.busy = kind === "busy" ? "true" : "false";
  }

  function showError(message) {
    el.error.hidden = !message;
    el.error.textContent = message || "";
    if (message) setStatus("error", "");
  }

  // Run is possible only with a model, a successfully loaded study and nothing in flight.
  function updateButtons() {
    const hasStudy = Boolean(state.study) && !state.loading;
    el.runButton.disabled = !state.model || !hasStudy || Boolean(state.run);
    const grey = hasStudy && state.study.channels !== 3 && Boolean(state.window);
    el.windowSelect.disabled = !grey;
    el.wlReset.disabled = !grey || !windowChanged();
    for (const button of [el.zoomIn, el.zoomOut, el.zoomFit]) button.disabled = !hasStudy;
    el.slider.disabled = !hasStudy || sliceCount() < 2;
  }

  // -- model ------------------------------------------------------------------------------------

  function fillSelect(select, values, chosen, labels) {
    select.replaceChildren(
      ...values.map((v) => new Option((labels && labels[v]) || v, v, false, v === chosen)),
    );
  }

  async function loadModel() {
    try {
      const model = await requestJson("/v1/model");
      state.model = model;
      el.modelInfo.textContent = `${model.variant} model`;
      el.modelInfo.dataset.variant = model.variant;
      const task = model.tasks.includes("grounded-report") ? "grounded-report" : model.tasks[0];
      fillSelect(el.taskSelect, model.tasks, task, TASK_LABELS);
      fillSelect(el.languageSelect, model.languages, model.languages[0], LANGUAGE_LABELS);
      if (model.max_new_tokens) el.maxTokens.max = String(model.max_new_tokens);
      updateTaskFields();
      updateButtons();
    } catch (err) {
      el.modelInfo.textContent = "not connected";
      showError(err.message);
    }
  }

  function updateTaskFields() {
    const task = el.taskSelect.value;
    for (const row of document.querySelectorAll(".task-field")) {
      row.hidden = !row.dataset.tasks.split(" ").includes(task);
    }
  }

  // -- study lifecycle ----------------------------------------------------------------------------

  // Forget the loaded study, its pixels and results (the server copy is deleted).
  function resetStudy() {
    cancelRun();
    deleteStudy(state.study);
    state.gen += 1;
    state.study = null;
    state.files = [];
    state.cache.clear();
    state.inflight.clear();
    state.sliceBitmap = null;
    state.bitmapIndex = -1;
    state.window = null;
    state.view = { zoom: 1, panX: 0, panY: 0 };
    clearResults();
    el.canvas.dataset.sliceIndex = "-1";
    el.canvas.dataset.studyId = "";
    el.windowSelect.replaceChildren();
    el.slider.max = "0";
    el.slider.value = "0";
    el.sliceLabel.textContent = "–";
    el.emptyHint.hidden = false;
    el.overlayInfo.hidden = true;
    showOrientation(null);
    updateWindowReadout();
    draw();
  }

  async function loadStudy(files) {
    if (!files || !files.length) return;
    resetStudy();
    showError(null);
    const limit = state.model && state.model.max_upload_bytes;
    const size = files.reduce((sum, f) => sum + f.size, 0);
    if (limit && size > limit) {
      el.emptyHint.textContent = "The upload failed: choose other files.";
      const mib = (n) => `${(n / 1024 ** 2).toFixed(1)} MiB`;
      showError(`the files are too large (${mib(size)}; the server accepts at most ${mib(limit)})`);
      return;
    }
    const gen = state.gen;
    state.loading = true;
    el.emptyHint.textContent = "Uploading…";
    updateButtons();
    setStatus("busy", `Uploading ${files.length} file(s)…`);
    try {
      const study = await uploadFiles(files);
      if (gen !== state.gen) {
        deleteStudy(study); // replaced while uploading
        return;
      }
      state.loading = false;
      state.study = study;
      state.files = files;
      setupStudy(study);
      const what = study.modality || (study.channels === 3 ? "colour image" : "image");
      setStatus("done", `${study.n_slices} slice(s), ${what}`);
      await showSlice(Math.floor(study.n_slices / 2));
    } catch (err) {
      if (gen !== state.gen || err instanceof StaleError) return;
      state.loading = false;
      el.emptyHint.textContent = "The upload failed: choose other files.";
      updateButtons();
      showError(err.message);
    }
  }

  function setupStudy(study) {
    el.canvas.dataset.studyId = study.study_id;
    el.slider.max = String(study.n_slices - 1);
    el.emptyHint.hidden = true;
    el.overlayInfo.hidden = false;
    setupWindows(study);
    showOrientation(study.orientation);
    updateButtons();
    renderResult();
  }

  function showOrientation(orientation) {
    for (const [edge, node] of Object.entries(el.orient)) {
      const letter = orientation && orientation[edge];
      node.hidden = !letter;
      node.textContent = letter || "";
    }
  }

  // "slice 11 / 20 · S −123.5 mm"
  function sliceText(index) {
    const study = state.study;
    let text = `slice ${index + 1} / ${study.n_slices}`;
    const positions = study.slice_positions_mm;
    if (positions && Number.isFinite(positions[index])) {
      const mm = positions[index].toFixed(1).replace("-", "\u2212");
      text += ` \u00b7 ${study.position_axis ? `${study.position_axis} ` : ""}${mm} mm`;
    }
    return text;
  }

  // -- slice pixels -------------------------------------------------------------------------------

  const TYPED = { int16: Int16Array, float32: Float32Array, uint8: Uint8Array };

  // Raw little-endian values as a typed array (byte-swapped on big-endian machines).
  function decodePixels(buffer, dtype) {
    const Typed = TYPED[dtype];
    if (!Typed) throw new Error(`unsupported pixel type ${dtype}`);
    if (LITTLE_ENDIAN || Typed.BYTES_PER_ELEMENT === 1) return new Typed(buffer);
    const view = new DataView(buffer);
    const out = new Typed(buffer.byteLength / Typed.BYTES_PER_ELEMENT);
    for (let i = 0; i < out.length; i += 1) {
      out[i] = dtype === "int16" ? view.getInt16(i * 2, true) : view.getFloat32(i * 4, true);
    }
    return out;
  }

  async function fetchSlice(index) {
    const response = await studyRequest(
      (id) => `/v1/studies/${encodeURIComponent(id)}/slices/${index}/pixels`,
    );
    const study = state.study;
    const header = (name, fallback) => Number(response.headers.get(name)) || fallback;
    const rows = header("X-Rows", study.height);
    const cols = header("X-Columns", study.width);
    const channels = header("X-Channels", study.channels || 1);
    const dtype = response.headers.get("X-Pixel-Dtype") || study.pixel_dtype;
    const values = decodePixels(await response.arrayBuffer(), dtype);
    if (values.length !== rows * cols * channels) {
      throw new Error(`slice ${index + 1}: expected ${rows}×${cols}×${channels} values, got ${values.length}`);
    }
    return { rows, cols, channels, values };
  }

  // The slice from the cache or the server; concurrent callers share one request.
  function getSlice(index) {
    const cached = state.cache.get(index);
    if (cached) {
      state.cache.delete(index); // most recently used last
      state.cache.set(index, cached);
      return Promise.resolve(cached);
    }
    if (state.inflight.has(index)) return state.inflight.get(index);
    const gen = state.gen;
    const promise = fetchSlice(index)
      .then((slice) => {
        if (gen !== state.gen) throw new StaleError("study replaced");
        state.cache.set(index, slice);
        while (state.cache.size > CACHE_SLICES) state.cache.delete(state.cache.keys().next().value);
        return slice;
      })
      .finally(() => {
        if (gen === state.gen) state.inflight.delete(index);
      });
    state.inflight.set(index, promise);
    return promise;
  }

  let prefetchToken = 0;

  // After the current slice: its neighbours, one at a time, until the user moves on.
  async function prefetchAround(index) {
    const token = (prefetchToken += 1);
    for (const offset of PREFETCH) {
      const k = index + offset;
      if (token !== prefetchToken) return;
      if (k < 0 || k >= sliceCount() || state.cache.has(k)) continue;
      try {
        await getSlice(k);
      } catch (err) {
        return;
      }
    }
  }

  async function showSlice(index) {
    if (!state.study) return;
    const n = state.study.n_slices;
    index = Math.max(0, Math.min(n - 1, index));
    state.index = index;
    el.slider.value = String(index);
    el.sliceLabel.textContent = sliceText(index);
    try {
      const slice = await getSlice(index);
      if (state.index !== index) return; // scrolled on meanwhile
      await prepareMasks(index);
      if (state.index !== index || !state.study) return;
      renderBitmap(slice, index);
      renderResult();
      draw();
      prefetchAround(index);
    } catch (err) {
      if (err instanceof StaleError || state.index !== index) return;
      showError(err.message);
    }
  }

  // -- window / level -----------------------------------------------------------------------------

  // Presets with their values: the study's own (CT presets, "auto" for MR and grey images),
  // else the model's.
  function presetsOf(study) {
    const own = study.windows && Object.keys(study.windows).length ? study.windows : null;
    const presets = own || (state.model && state.model.window_values) || {};
    if (!Object.keys(presets).length && study.value_range) {
      const [lo, hi] = study.value_range;
      return { auto: { center: (lo + hi) / 2, width: Math.max(hi - lo, 1e-6) } };
    }
    return presets;
  }

  function setupWindows(study) {
    if (study.channels === 3) {
      state.window = null;
      el.windowSelect.replaceChildren(new Option("RGB image", ""));
      updateWindowReadout();
      return;
    }
    const presets = presetsOf(study);
    const names = Object.keys(presets);
    const chosen = names.includes(study.default_window) ? study.default_window : names[0];
    el.windowSelect.replaceChildren(
      ...names.map((name) => {
        const p = presets[name];
        const text = `${windowLabel(name)} (W ${fmtNum(p.width)} / L ${fmtNum(p.center)})`;
        return new Option(text, name, false, name === chosen);
      }),
    );
    el.windowSelect.dataset.presets = JSON.stringify(presets);
    choosePreset(chosen);
  }

  function choosePreset(name) {
    const presets = JSON.parse(el.windowSelect.dataset.presets || "{}");
    const p = presets[name];
    if (!p) return;
    state.window = {
      name,
      center: p.center,
      width: p.width,
      presetCenter: p.center,
      presetWidth: p.width,
    };
    windowChangedRedraw();
  }

  function windowChanged() {
    const w = state.window;
    return Boolean(w) && (w.center !== w.presetCenter || w.width !== w.presetWidth);
  }

  function updateWindowReadout() {
    const w = state.window;
    el.canvas.dataset.window = w ? w.name : "";
    el.canvas.dataset.windowWidth = w ? String(w.width) : "";
    el.canvas.dataset.windowLevel = w ? String(w.center) : "";
    el.wlReadout.textContent = w
      ? `W ${fmtNum(w.width)} / L ${fmtNum(w.center)}${windowChanged() ? " (manual)" : ""}`
      : state.study
        ? "RGB"
        : "";
  }

  // Re-window the current slice: everything happens here, no request.
  function windowChangedRedraw() {
    updateWindowReadout();
    updateButtons();
    const slice = state.cache.get(state.index);
    if (slice && state.bitmapIndex === state.index) {
      renderBitmap(slice, state.index);
      draw();
    }
  }

  // A dragged distance in screen pixels becomes this many value units (a full drag across
  // ~500 px sweeps the study's value range).
  function wlSensitivity() {
    const range = state.study && state.study.value_range;
    const span = range ? Math.abs(range[1] - range[0]) : 0;
    return span > 0 ? span / 500 : 1;
  }

  function adjustWindow(dx, dy) {
    const w = state.window;
    if (!w) return;
    const k = wlSensitivity();
    w.width = Math.max(k, roundTo(w.width + dx * k, k));
    w.center = roundTo(w.center + dy * k, k);
    windowChangedRedraw();
  }

  // Round to a step that suits the value range (whole HU for CT, finer for small ranges).
  function roundTo(value, k) {
    const step = k >= 1 ? 1 : 10 ** Math.floor(Math.log10(k));
    return Math.round(value / step) * step;
  }

  // The slice as an RGBA bitmap: grey values windowed, RGB as is.
  function renderBitmap(slice, index) {
    const { rows, cols, channels, values } = slice;
    let bitmap = state.sliceBitmap;
    if (!bitmap || bitmap.width !== cols || bitmap.height !== rows) {
      bitmap = document.createElement("canvas");
      bitmap.width = cols;
      bitmap.height = rows;
      state.sliceBitmap = bitmap;
    }
    const c = bitmap.getContext("2d");
    const image = c.createImageData(cols, rows);
    const out = image.data; // Uint8ClampedArray: clamps and rounds on assignment
    const n = rows * cols;
    if (channels === 3) {
      for (let i = 0; i < n; i += 1) {
        out[4 * i] = values[3 * i];
        out[4 * i + 1] = values[3 * i + 1];
        out[4 * i + 2] = values[3 * i + 2];
        out[4 * i + 3] = 255;
      }
    } else {
      const w = state.window || { center: 127.5, width: 255 };
      const lo = w.center - w.width / 2;
      const scale = 255 / w.width;
      for (let i = 0; i < n; i += 1) {
        const v = (values[i * channels] - lo) * scale;
        out[4 * i] = v;
        out[4 * i + 1] = v;
        out[4 * i + 2] = v;
        out[4 * i + 3] = 255;
      }
    }
    c.putImageData(image, 0, 0);
    state.bitmapIndex = index;
  }

  // -- view: canvas size, zoom and pan -------------------------------------------------------------

  // Keep the canvas' backing store at the displayed size (device pixels).
  function resizeCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(el.wrap.clientWidth * dpr));
    const height = Math.max(1, Math.round(el.wrap.clientHeight * dpr));
    if (el.canvas.width !== width || el.canvas.height !== height) {
      el.canvas.width = width;
      el.canvas.height = height;
      clampPan();
      draw();
    }
  }

  // Image pixel (x, y) -> canvas pixel: x * scale + ox. "fit" shows the whole image.
  function viewTransform() {
    const study = state.study;
    const w = study ? study.width : 1;
    const h = study ? study.height : 1;
    const fit = Math.min(el.canvas.width / w, el.canvas.height / h);
    const scale = fit * state.view.zoom;
    return {
      scale,
      ox: (el.canvas.width - w * scale) / 2 + state.view.panX,
      oy: (el.canvas.height - h * scale) / 2 + state.view.panY,
      w,
      h,
    };
  }

  // At least a corner of the image stays in view.
  function clampPan() {
    const study = state.study;
    if (!study) return;
    const fit = Math.min(el.canvas.width / study.width, el.canvas.height / study.height);
    const s = fit * state.view.zoom;
    const limX = Math.max(0, (study.width * s + el.canvas.width) / 2 - 32);
    const limY = Math.max(0, (study.height * s + el.canvas.height) / 2 - 32);
    state.view.panX = Math.max(-limX, Math.min(limX, state.view.panX));
    state.view.panY = Math.max(-limY, Math.min(limY, state.view.panY));
  }

  // Zoom by `factor` keeping the image point under canvas pixel (cx, cy) in place.
  function zoomBy(factor, cx, cy) {
    if (!state.study) return;
    const before = viewTransform();
    const zoom = Math.max(ZOOM_MIN, Math.min(ZOOM_MAX, state.view.zoom * factor));
    const px = cx === undefined ? el.canvas.width / 2 : cx;
    const py = cy === undefined ? el.canvas.height / 2 : cy;
    const ix = (px - before.ox) / before.scale;
    const iy = (py - before.oy) / before.scale;
    state.view.zoom = zoom;
    const after = viewTransform();
    state.view.panX += px - (after.ox + ix * after.scale);
    state.view.panY += py - (after.oy + iy * after.scale);
    clampPan();
    draw();
  }

  function zoomFit() {
    state.view = { zoom: 1, panX: 0, panY: 0 };
    draw();
  }

  function isZoomed() {
    const v = state.view;
    return Math.abs(v.zoom - 1) > 1e-6 || v.panX !== 0 || v.panY !== 0;
  }

  // Event position -> canvas pixels and image pixels.
  function pointerPos(event) {
    const rect = el.canvas.getBoundingClientRect();
    const cx = ((event.clientX - rect.left) / rect.width) * el.canvas.width;
    const cy = ((event.clientY - rect.top) / rect.height) * el.canvas.height;
    const t = viewTransform();
    return { cx, cy, x: (cx - t.ox) / t.scale, y: (cy - t.oy) / t.scale };
  }

  // -- drawing ------------------------------------------------------------------------------------

  function colorOf(classId) {
    const colors = (state.model && state.model.colors) || {};
    return colors[classId === null || classId === undefined ? "null" : String(classId)] || "#ffff00";
  }

  function rgbOf(hex) {
    const v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  // Black or white text, whichever reads better on `hex`.
  function textColorOn(hex) {
    const [r, g, b] = rgbOf(hex);
    return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000000" : "#ffffff";
  }

  function spanName(span) {
    const names = (state.model && state.model.display_names) || {};
    const pred = state.bySlice.get(state.index);
    const lang = (pred && names[pred.language]) || {};
    return (span.class_id !== null && lang[span.class_id]) || span.display_name || span.label;
  }

  // Normalised boxes of a span (the API sends "boxes"; a single "box" is accepted too).
  function boxesOf(span) {
    if (Array.isArray(span.boxes)) return span.boxes;
    return span.box ? [span.box] : [];
  }

  // Decode each mask PNG once: a tinted canvas, its alpha for hit tests, its bounding box.
  async function prepareMasks(index) {
    const pred = state.bySlice.get(index);
    if (!pred) return;
    const jobs = pred.spans.map(async (span, i) => {
      const key = `${index}:${i}`;
      if (!span.mask_png || state.masks.has(key)) return;
      const image = new Image();
      image.src = `data:image/png;base64,${span.mask_png}`;
      await image.decode();
      const canvas = document.createElement("canvas");
      canvas.width = image.width;
      canvas.height = image.height;
      const c = canvas.getContext("2d");
      c.drawImage(image, 0, 0);
      const data = c.getImageData(0, 0, canvas.width, canvas.height);
      const [r, g, b] = rgbOf(colorOf(span.class_id));
      let x1 = Infinity;
      let y1 = Infinity;
      let x2 = -1;
      let y2 = -1;
      for (let p = 0; p < data.data.length; p += 4) {
        const on = data.data[p] > 127;
        data.data[p] = r;
        data.data[p + 1] = g;
        data.data[p + 2] = b;
        data.data[p + 3] = on ? 255 : 0;
        if (on) {
          const x = (p / 4) % canvas.width;
          const y = Math.floor(p / 4 / canvas.width);
          x1 = Math.min(x1, x);
          y1 = Math.min(y1, y);
          x2 = Math.max(x2, x);
          y2 = Math.max(y2, y);
        }
      }
      c.putImageData(data, 0, 0);
      const bbox = x2 >= 0 ? [x1, y1, x2 + 1, y2 + 1] : null;
      state.masks.set(key, { canvas, data: data.data, width: canvas.width, height: canvas.height, bbox });
    });
    await Promise.all(jobs);
  }

  // A numbered label (a filled tag with the phrase number) at canvas point (x, y), above
  // it when there is room.
  function drawLabel(text, x, y, color, active) {
    const dpr = window.devicePixelRatio || 1;
    const size = Math.round((active ? 14 : 12) * dpr);
    ctx.font = `${active ? "700 " : "600 "}${size}px system-ui, "DejaVu Sans", sans-serif`;
    const pad = Math.round(3 * dpr);
    const w = Math.ceil(ctx.measureText(text).width) + 2 * pad;
    const h = size + 2 * pad;
    const lx = Math.round(Math.max(0, Math.min(el.canvas.width - w, x)));
    const ly = Math.round(y - h >= 0 ? y - h : Math.min(el.canvas.height - h, y));
    ctx.fillStyle = color;
    ctx.fillRect(lx, ly, w, h);
    ctx.fillStyle = textColorOn(color);
    ctx.textBaseline = "middle";
    ctx.fillText(text, lx + pad, ly + h / 2 + 1);
    return { x: lx, y: ly, w, h };
  }

  function draw() {
    const { width, height } = el.canvas;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const t = viewTransform();
    const shown = state.study && state.sliceBitmap && state.bitmapIndex === state.index;
    if (shown) {
      ctx.fillStyle = "#000000";
      ctx.fillRect(0, 0, width, height);
      // Magnified pixels stay crisp; shrunk images are smoothed.
      ctx.imageSmoothingEnabled = t.scale < 1;
      ctx.drawImage(state.sliceBitmap, t.ox, t.oy, t.w * t.scale, t.h * t.scale);
      ctx.imageSmoothingEnabled = true;
      el.canvas.dataset.sliceIndex = String(state.index);
    }
    const { boxes, maskLabels } = shown ? drawOverlays(t) : { boxes: [], maskLabels: [] };
    state.drawnBoxes = boxes;
    el.canvas.dataset.boxes = JSON.stringify(boxes);
    el.canvas.dataset.masks = String(maskLabels.length);
    el.canvas.dataset.maskLabels = JSON.stringify(maskLabels);
    el.canvas.dataset.highlight = state.highlight === null ? "" : String(state.highlight);
    el.canvas.dataset.zoom = String(Number(state.view.zoom.toFixed(4)));
    el.canvas.dataset.zoomed = String(isZoomed());
    el.canvas.dataset.view = JSON.stringify({
      scale: t.scale,
      ox: t.ox,
      oy: t.oy,
      zoom: state.view.zoom,
      panX: state.view.panX,
      panY: state.view.panY,
    });
    el.zoomReadout.textContent = state.study ? `zoom ${Math.round(state.view.zoom * 100)} %` : "";
  }

  // Masks, then boxes, then the numbered labels on top. Returns what was drawn, in image
  // pixels and canvas pixels, for hit tests and the tests' data attributes.
  function drawOverlays(t) {
    const pred = state.bySlice.get(state.index);
    const boxes = [];
    const maskLabels = [];
    if (!pred) return { boxes, maskLabels };
    const refs = refNumbers(pred);
    const labels = [];
    pred.spans.forEach((span, i) => {
      const mask = state.masks.get(`${state.index}:${i}`);
      if (!mask) return;
      ctx.globalAlpha = state.highlight === i ? 0.65 : state.highlight === null ? 0.35 : 0.2;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(mask.canvas, t.ox, t.oy, t.w * t.scale, t.h * t.scale);
      ctx.imageSmoothingEnabled = true;
      ctx.globalAlpha = 1;
      if (mask.bbox) {
        const sx = t.w / mask.width;
        const sy = t.h / mask.height;
        const x = t.ox + mask.bbox[0] * sx * t.scale;
        const y = t.oy + mask.bbox[1] * sy * t.scale;
        labels.push({ span: i, x, y, color: colorOf(span.class_id), mask: true });
      }
    });
    const dpr = window.devicePixelRatio || 1;
    const line = Math.max(1, Math.round(2 * dpr));
    pred.spans.forEach((span, i) => {
      const color = colorOf(span.class_id);
      const active = state.highlight === i;
      for (const box of boxesOf(span)) {
        const x1 = Math.round(box[0] * t.w);
        const y1 = Math.round(box[1] * t.h);
        const x2 = Math.round(box[2] * t.w);
        const y2 = Math.round(box[3] * t.h);
        const cx1 = Math.round(t.ox + box[0] * t.w * t.scale);
        const cy1 = Math.round(t.oy + box[1] * t.h * t.scale);
        const cx2 = Math.round(t.ox + box[2] * t.w * t.scale);
        const cy2 = Math.round(t.oy + box[3] * t.h * t.scale);
        if (active) {
          ctx.fillStyle = color;
          ctx.globalAlpha = 0.2;
          ctx.fillRect(cx1, cy1, cx2 - cx1, cy2 - cy1);
          ctx.globalAlpha = 1;
        }
        ctx.strokeStyle = color;
        ctx.lineWidth = active ? line * 2 : line;
        ctx.strokeRect(cx1, cy1, Math.max(1, cx2 - cx1), Math.max(1, cy2 - cy1));
        const entry = { span: i, ref: refs.get(i), class_id: span.class_id, color, x1, y1, x2, y2 };
        Object.assign(entry, { cx1, cy1, cx2, cy2, line: active ? line * 2 : line });
        boxes.push(entry);
        labels.push({ span: i, x: cx1 - line, y: cy1 - line, color, box: entry });
      }
    });
    // Labels last so boxes never cover them; the highlighted one on top.
    labels.sort((a, b) => (a.span === state.highlight) - (b.span === state.highlight));
    for (const label of labels) {
      const active = state.highlight === label.span;
      const ref = refs.get(label.span);
      const text = active ? `${ref} ${spanName(pred.spans[label.span])}` : String(ref);
      const rect = drawLabel(text, label.x, label.y, label.color, active);
      if (label.box) label.box.label = { text, ...rect };
      if (label.mask) maskLabels.push({ span: label.span, ref, text, ...rect });
    }
    return { boxes, maskLabels };
  }

  // -- results ------------------------------------------------------------------------------------

  // Phrase numbers: 1, 2, … for the spans with a box or mask, in reading order.
  function refNumbers(pred) {
    const refs = new Map();
    pred.spans.forEach((span, i) => {
      if (boxesOf(span).length || span.mask_png) refs.set(i, refs.size + 1);
    });
    return refs;
  }

  function clearResults() {
    state.bySlice.clear();
    state.masks.clear();
    state.lastRun = null;
    state.highlight = null;
    state.pinned = null;
    el.download.disabled = true;
    renderResult();
  }

  function renderResult() {
    const pred = state.bySlice.get(state.index);
    el.legend.replaceChildren();
    el.problems.hidden = true;
    el.report.dataset.empty = "false";
    if (!pred) {
      el.report.dataset.state = "empty";
      el.report.dataset.spans = "0";
      el.resultMeta.textContent = "";
      el.report.replaceChildren(noResultMessage());
      return;
    }
    el.report.dataset.state = "result";
    el.report.dataset.spans = String(pred.spans.length);
    el.report.lang = pred.language;
    const slice = pred.slice_index === null || pred.slice_index === undefined ? "" : ` · slice ${pred.slice_index + 1}`;
    el.resultMeta.textContent = `${TASK_LABELS[pred.task] || pred.task} · ${LANGUAGE_LABELS[pred.language] || pred.language}${slice}`;
    if (!pred.text || !pred.text.trim()) {
      el.report.dataset.empty = "true";
      const note = document.createElement("p");
      note.className = "note";
      note.id = "empty-answer";
      note.textContent = "The model returned no text for this slice.";
      el.report.replaceChildren(note);
    } else {
      el.report.replaceChildren(...reportParts(pred));
    }
    renderLegend(pred);
    if (pred.problems && pred.problems.length) {
      el.problems.hidden = false;
      el.problems.textContent = `Decoding notes: ${pred.problems.join("; ")}`;
    }
  }

  // The text with each grounded phrase marked and followed by its number, e.g. "liver[1]".
  function reportParts(pred) {
    const chars = Array.from(pred.text); // span offsets count code points
    const refs = refNumbers(pred);
    const order = pred.spans.map((_, i) => i).sort((a, b) => pred.spans[a].start - pred.spans[b].start);
    const parts = [];
    let pos = 0;
    for (const i of order) {
      const span = pred.spans[i];
      if (span.start < pos) continue; // overlapping spans: keep the first
      parts.push(document.createTextNode(chars.slice(pos, span.start).join("")));
      const mark = document.createElement("mark");
      mark.className = "phrase";
      mark.textContent = chars.slice(span.start, span.end).join("");
      mark.dataset.spanIndex = String(i);
      mark.dataset.classId = span.class_id === null ? "" : String(span.class_id);
      mark.dataset.active = "false";
      mark.dataset.located = String(refs.has(i));
      mark.style.setProperty("--c", colorOf(span.class_id));
      mark.title = refs.has(i) ? spanName(span) : `${spanName(span)} (no location)`;
      linkHover(mark, i);
      parts.push(mark);
      if (refs.has(i)) {
        const sup = document.createElement("sup");
        sup.className = "ref";
        sup.dataset.ref = String(refs.get(i));
        sup.dataset.spanIndex = String(i);
        sup.dataset.active = "false";
        sup.textContent = `[${refs.get(i)}]`;
        linkHover(sup, i);
        parts.push(sup);
      }
      pos = span.end;
    }
    parts.push(document.createTextNode(chars.slice(pos).join("")));
    return parts;
  }

  // Hover highlights span i; a click pins (or unpins) it.
  function linkHover(node, i) {
    node.addEventListener("mouseenter", () => setHighlight(i));
    node.addEventListener("mouseleave", () => setHighlight(state.pinned));
    node.addEventListener("click", () => {
      state.pinned = state.pinned === i ? null : i;
      setHighlight(state.pinned);
    });
  }

  function noResultMessage() {
    const box = document.createElement("span");
    box.className = "note";
    if (!state.bySlice.size) {
      box.textContent = state.study ? "Run the model to see a result." : "No study loaded.";
      return box;
    }
    box.append("No result for this slice yet. Results on slice: ");
    for (const k of [...state.bySlice.keys()].sort((a, b) => a - b)) {
      const button = document.createElement("button");
      button.className = "goto-slice";
      button.type = "button";
      button.dataset.gotoSlice = String(k);
      button.textContent = String(k + 1);
      button.addEventListener("click", () => showSlice(k));
      box.append(button);
    }
    return box;
  }

  function renderLegend(pred) {
    const seen = new Map();
    pred.spans.forEach((span, i) => {
      const key = span.class_id === null ? `label:${span.label}` : String(span.class_id);
      if (!seen.has(key)) seen.set(key, { name: spanName(span), classId: span.class_id, spans: [] });
      seen.get(key).spans.push(i);
    });
    for (const entry of seen.values()) {
      const item = document.createElement("li");
      item.dataset.classId = entry.classId === null ? "" : String(entry.classId);
      item.dataset.spans = entry.spans.join(",");
      item.dataset.active = "false";
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.setProperty("--c", colorOf(entry.classId));
      item.append(swatch, entry.name);
      item.addEventListener("mouseenter", () => setHighlight(entry.spans[0]));
      item.addEventListener("mouseleave", () => setHighlight(state.pinned));
      el.legend.append(item);
    }
  }

  function setHighlight(index) {
    state.highlight = index === undefined ? null : index;
    for (const node of el.report.querySelectorAll(".phrase, .ref")) {
      node.dataset.active = String(Number(node.dataset.spanIndex) === state.highlight);
    }
    for (const item of el.legend.children) {
      const spans = item.dataset.spans.split(",").map(Number);
      item.dataset.active = String(spans.includes(state.highlight));
    }
    draw();
  }

  // The span under image point (x, y): the smallest box containing it, else a mask hit.
  function spanAt(x, y) {
    const t = viewTransform();
    let best = null;
    let bestArea = Infinity;
    for (const b of state.drawnBoxes) {
      const pad = b.line / t.scale;
      if (x >= b.x1 - pad && x <= b.x2 + pad && y >= b.y1 - pad && y <= b.y2 + pad) {
        const area = (b.x2 - b.x1) * (b.y2 - b.y1);
        if (area < bestArea) {
          best = b.span;
          bestArea = area;
        }
      }
    }
    if (best !== null) return best;
    const pred = state.bySlice.get(state.index);
    if (!pred || x < 0 || y < 0 || x >= t.w || y >= t.h) return null;
    for (let i = 0; i < pred.spans.length; i += 1) {
      const mask = state.masks.get(`${state.index}:${i}`);
      if (!mask) continue;
      const mx = Math.floor((x * mask.width) / t.w);
      const my = Math.floor((y * mask.height) / t.h);
      if (mask.data[(my * mask.width + mx) * 4 + 3] > 0) return i;
    }
    return null;
  }

  // -- run ------------------------------------------------------------------------------------------

  function predictForm(index) {
    const form = new FormData();
    const task = el.taskSelect.value;
    form.append("task", task);
    form.append("language", el.languageSelect.value);
    form.append("slice", String(index));
    form.append("max_new_tokens", el.maxTokens.value || "100");
    if (task === "vqa") form.append("question", el.questionInput.value);
    if (task === "detect" || task === "segment") form.append("structures", el.structuresInput.value);
    if (task === "report" || task === "grounded-report") {
      if (el.clinicalInput.value.trim()) form.append("clinical_info", el.clinicalInput.value);
      if (el.clinicalQuestionInput.value.trim()) {
        form.append("clinical_question", el.clinicalQuestionInput.value);
      }
    }
    return form;
  }

  async function predictSlice(index, signal) {
    const form = predictForm(index);
    const response = await studyRequest(
      (id) => `/v1/studies/${encodeURIComponent(id)}/predict`,
      { method: "POST", body: form, signal },
    );
    return response.json();
  }

  // Busy state of a run: Run disabled, Cancel shown, a ticking elapsed time.
  function startRunUi(total) {
    const started = performance.now();
    const tick = () => {
      const ms = performance.now() - started;
      el.elapsed.dataset.ms = String(Math.round(ms));
      el.elapsed.textContent = `${(ms / 1000).toFixed(1)} s`;
    };
    tick();
    el.elapsed.hidden = false;
    el.cancelButton.hidden = false;
    el.cancelButton.disabled = false;
    el.runProgress.hidden = total < 2;
    setProgress(0, total);
    return { tick, interval: setInterval(tick, 100) };
  }

  function setProgress(done, total) {
    el.progress.max = Math.max(total, 1);
    el.progress.value = done;
    el.progressLabel.textContent = `${done} / ${total}`;
  }

  function cancelRun() {
    const run = state.run;
    if (!run) return;
    run.cancelled = true;
    run.controller.abort();
  }

  async function run() {
    if (!state.study || state.loading || state.run) return; // only a loaded study is sent
    showError(null);
    const gen = state.gen;
    const all = el.scopeAll.checked && sliceCount() > 1;
    const indices = all ? [...Array(sliceCount()).keys()] : [state.index];
    const runState = { controller: new AbortController(), cancelled: false, timer: null };
    state.run = runState;
    runState.timer = startRunUi(indices.length);
    updateButtons();
    const responses = [];
    let failure = null;
    for (const [done, k] of indices.entries()) {
      if (runState.cancelled) break;
      setStatus("busy", all ? `Running slice ${k + 1} (${done + 1} of ${indices.length})…` : `Running slice ${k + 1}…`);
      try {
        const response = await predictSlice(k, runState.controller.signal);
        if (gen !== state.gen) break;
        responses.push(response);
        await storeResponse(response, k, responses.length === 1);
        setProgress(done + 1, indices.length);
      } catch (err) {
        if (isAbort(err) || err instanceof StaleError) break;
        failure = err;
        break;
      }
    }
    finishRun(runState, responses, indices.length, failure, gen);
  }

  // Keep a response's predictions per slice and redraw when it is the slice on screen.
  // The first response of a run starts a new "last run" for Download JSON.
  async function storeResponse(response, requested, first) {
    for (const pred of response.predictions) {
      const k = pred.slice_index === null || pred.slice_index === undefined ? requested : pred.slice_index;
      state.bySlice.set(k, pred);
      for (const key of [...state.masks.keys()]) if (key.startsWith(`${k}:`)) state.masks.delete(key);
    }
    if (first || !state.lastRun) state.lastRun = { request_ids: [], predictions: [] };
    state.lastRun.request_ids.push(response.request_id);
    state.lastRun.predictions.push(...response.predictions);
    el.download.disabled = false;
    if (state.bySlice.has(state.index)) {
      state.highlight = state.pinned = null;
      await prepareMasks(state.index);
      renderResult();
      draw();
    }
  }

  function finishRun(runState, responses, total, failure, gen) {
    clearInterval(runState.timer.interval);
    runState.timer.tick(); // the final time, not the last 100 ms tick
    if (state.run === runState) state.run = null;
    el.cancelButton.hidden = true;
    if (gen !== state.gen) {
      el.elapsed.hidden = true;
      el.runProgress.hidden = true;
      updateButtons();
      return;
    }
    const n = responses.reduce((sum, r) => sum + r.predictions.length, 0);
    const time = el.elapsed.textContent;
    if (failure) {
      showError(failure.message);
    } else if (runState.cancelled) {
      setStatus("cancelled", `Cancelled after ${responses.length} / ${total} slice(s), ${time}`);
    } else {
      const ids = responses.map((r) => r.request_id);
      const request = ids.length === 1 ? `request ${ids[0]}` : `${ids.length} requests`;
      setStatus("done", `Done: ${n} prediction(s), ${request}, ${time}`);
    }
    updateButtons();
  }

  function downloadJson() {
    const last = state.lastRun;
    if (!last) return;
    const body = {
      study_id: state.study ? state.study.study_id : null,
      n_slices: sliceCount(),
      request_ids: last.request_ids,
      predictions: last.predictions,
    };
    const blob = new Blob([JSON.stringify(body, null, 2)], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `radgrounder-${last.request_ids[last.request_ids.length - 1]}.json`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  // -- input: files and drag and drop ----------------------------------------------------------------

  // Every file of a dropped folder (recursively), via the entries API.
  async function filesOfEntry(entry) {
    if (entry.isFile) {
      return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
    }
    const reader = entry.createReader();
    const out = [];
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) out.push(...(await filesOfEntry(child)));
    }
    return out;
  }

  async function droppedFiles(dataTransfer) {
    const entries = [...(dataTransfer.items || [])]
      .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
      .filter(Boolean);
    if (!entries.length) return [...dataTransfer.files];
    const files = [];
    for (const entry of entries) files.push(...(await filesOfEntry(entry)));
    return files;
  }

  function makeDropTarget(target) {
    const flag = target === el.dropZone ? "state" : "drop";
    for (const name of ["dragenter", "dragover"]) {
      target.addEventListener(name, (event) => {
        event.preventDefault();
        target.dataset[flag] = "over";
      });
    }
    target.addEventListener("dragleave", () => { target.dataset[flag] = "idle"; });
    target.addEventListener("drop", async (event) => {
      event.preventDefault();
      target.dataset[flag] = "idle";
      try {
        loadStudy(await droppedFiles(event.dataTransfer));
      } catch (err) {
        showError(`cannot read the dropped files (${err.message})`);
      }
    });
  }

  // -- input: mouse on the image ---------------------------------------------------------------------

  // One drag at a time: "wl" (right button or Shift+left), "pan" (left when zoomed, or
  // the middle button); a left click without movement pins the box under the pointer.
  let drag = null;

  function onPointerDown(event) {
    if (!state.study) return;
    const wl = event.button === 2 || (event.button === 0 && event.shiftKey);
    const pan = !wl && (event.button === 1 || (event.button === 0 && isZoomed()));
    const mode = wl && state.window ? "wl" : pan ? "pan" : "click";
    drag = { mode, x: event.clientX, y: event.clientY, moved: false };
    el.canvas.dataset.mode = mode === "click" ? "idle" : mode;
    if (mode !== "click") event.preventDefault();
  }

  function onPointerMove(event) {
    if (drag) {
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      if (dx || dy) drag.moved = true;
      drag.x = event.clientX;
      drag.y = event.clientY;
      if (drag.mode === "wl") adjustWindow(dx, dy);
      if (drag.mode === "pan") {
        const dpr = el.canvas.width / el.canvas.getBoundingClientRect().width;
        state.view.panX += dx * dpr;
        state.view.panY += dy * dpr;
        clampPan();
        draw();
      }
      return;
    }
    if (event.target !== el.canvas || !state.bySlice.has(state.index)) return;
    const { x, y } = pointerPos(event);
    const hit = spanAt(x, y);
    const next = hit === null ? state.pinned : hit;
    if (next !== state.highlight) setHighlight(next);
  }

  function onPointerUp(event) {
    if (!drag) return;
    const { mode, moved } = drag;
    drag = null;
    el.canvas.dataset.mode = "idle";
    if (mode === "click" && !moved && event.target === el.canvas && state.bySlice.has(state.index)) {
      const { x, y } = pointerPos(event);
      const hit = spanAt(x, y);
      state.pinned = hit === state.pinned ? null : hit;
      setHighlight(state.pinned);
    }
  }

  function onWheel(event) {
    if (!state.study) return;
    event.preventDefault();
    if (!event.deltaY) return;
    if (event.ctrlKey || event.metaKey) {
      const { cx, cy } = pointerPos(event);
      zoomBy(event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP, cx, cy);
    } else {
      showSlice(state.index + (event.deltaY > 0 ? 1 : -1));
    }
  }

  // -- wiring ------------------------------------------------------------------------------------------

  el.fileInput.addEventListener("change", () => {
    const files = [...el.fileInput.files];
    el.fileInput.value = ""; // choosing the same files again loads them again
    loadStudy(files);
  });
  el.windowSelect.addEventListener("change", () => choosePreset(el.windowSelect.value));
  el.wlReset.addEventListener("click", () => choosePreset(state.window && state.window.name));
  el.zoomIn.addEventListener("click", () => zoomBy(ZOOM_STEP));
  el.zoomOut.addEventListener("click", () => zoomBy(1 / ZOOM_STEP));
  el.zoomFit.addEventListener("click", zoomFit);
  el.taskSelect.addEventListener("change", updateTaskFields);
  el.runButton.addEventListener("click", run);
  el.cancelButton.addEventListener("click", cancelRun);
  el.download.addEventListener("click", downloadJson);
  el.slider.addEventListener("input", () => showSlice(Number(el.slider.value)));
  el.canvas.addEventListener("wheel", onWheel, { passive: false });
  el.canvas.addEventListener("mousedown", onPointerDown);
  el.canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  window.addEventListener("mousemove", onPointerMove);
  window.addEventListener("mouseup", onPointerUp);
  el.canvas.addEventListener("mouseleave", () => {
    if (!drag) setHighlight(state.pinned);
  });
  document.addEventListener("keydown", (event) => {
    if (!state.study || event.target.closest("input, select, textarea")) return;
    if (event.key === "ArrowUp" || event.key === "ArrowRight") showSlice(state.index + 1);
    if (event.key === "ArrowDown" || event.key === "ArrowLeft") showSlice(state.index - 1);
    if (event.key === "+" || event.key === "=") zoomBy(ZOOM_STEP);
    if (event.key === "-") zoomBy(1 / ZOOM_STEP);
    if (event.key === "0") zoomFit();
  });
  makeDropTarget(el.dropZone);
  makeDropTarget(el.wrap);
  // The server keeps uploads for a while; tell it when the page goes away.
  window.addEventListener("pagehide", () => deleteStudy(state.study));
  new ResizeObserver(resizeCanvas).observe(el.wrap);

  resizeCanvas();
  renderResult();
  updateButtons();
  loadModel();
})();
