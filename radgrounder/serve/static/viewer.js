// RadGrounder viewer: upload a study, scroll its slices, run the model and show grounded
// phrases with their boxes and masks. Plain browser JavaScript, no dependencies.
"use strict";

(() => {
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
    taskSelect: $("task-select"),
    languageSelect: $("language-select"),
    questionInput: $("question-input"),
    structuresInput: $("structures-input"),
    clinicalInput: $("clinical-info-input"),
    scopeAll: $("scope-all"),
    maxTokens: $("max-tokens-input"),
    runButton: $("run-button"),
    status: $("status"),
    error: $("error"),
    canvas: $("slice-canvas"),
    emptyHint: $("empty-hint"),
    slider: $("slice-slider"),
    sliceLabel: $("slice-label"),
    report: $("report"),
    legend: $("legend"),
    problems: $("problems"),
    download: $("download-json"),
  };
  const ctx = el.canvas.getContext("2d");

  const state = {
    token: null,
    model: null,
    files: [],
    study: null, // {n_slices, width, height, modality, slices: [base64 png]}
    images: new Map(), // slice index -> decoded HTMLImageElement
    index: 0,
    response: null,
    bySlice: new Map(), // slice index -> prediction
    masks: new Map(), // "slice:span" -> coloured mask canvas
    highlight: null, // span index
    pinned: null,
    drawnBoxes: [],
  };

  // -- API ------------------------------------------------------------------------------

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
    el.authPanel.hidden = true;
    el.authMessage.textContent = "";
    if (tokenWaiter) {
      tokenWaiter.resolve();
      tokenWaiter = null;
    }
  });

  // fetch() with the bearer token; on 401 ask for a token and try again.
  async function api(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
      let response;
      try {
        response = await fetch(path, { ...options, headers });
      } catch (err) {
        throw new Error(`cannot reach the server (${err.message})`);
      }
      if (response.status === 401) {
        await askForToken(state.token ? "The token was not accepted; try again." : "");
        continue;
      }
      let body = null;
      try {
        body = await response.json();
      } catch (err) {
        body = null;
      }
      if (!response.ok) {
        const detail = body && body.detail;
        const text = typeof detail === "string" ? detail : JSON.stringify(detail);
        throw new Error(text || `${response.status} ${response.statusText}`);
      }
      return body;
    }
  }

  // -- status -----------------------------------------------------------------------------

  function setBusy(message) {
    document.body.dataset.busy = message ? "true" : "false";
    el.status.dataset.state = message ? "busy" : "idle";
    el.status.textContent = message || "";
    el.runButton.disabled = Boolean(message) || !state.study || !state.model;
  }

  function showError(message) {
    el.error.hidden = !message;
    el.error.textContent = message || "";
    if (message) el.status.dataset.state = "error";
  }

  // -- model ------------------------------------------------------------------------------

  function fillSelect(select, values, chosen) {
    select.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
  }

  async function loadModel() {
    try {
      const model = await api("/v1/model");
      state.model = model;
      el.modelInfo.textContent = `${model.variant} model`;
      el.modelInfo.dataset.variant = model.variant;
      const task = model.tasks.includes("grounded-report") ? "grounded-report" : model.tasks[0];
      fillSelect(el.taskSelect, model.tasks, task);
      fillSelect(el.languageSelect, model.languages, model.languages[0]);
      fillSelect(el.windowSelect, model.windows, model.default_window);
      el.maxTokens.max = model.max_new_tokens;
      updateTaskFields();
      setBusy(null);
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

  // -- study --------------------------------------------------------------------------------

  function studyForm() {
    const form = new FormData();
    for (const file of state.files) form.append("files", file, file.name);
    return form;
  }

  async function loadStudy(files) {
    if (files) state.files = files;
    if (!state.files.length) return;
    showError(null);
    setBusy(`Loading ${state.files.length} file(s)…`);
    try {
      const form = studyForm();
      form.append("window", el.windowSelect.value || "soft_tissue");
      const study = await api("/v1/slices", { method: "POST", body: form });
      // A new window keeps the result; new files start afresh.
      const keep = !files && state.study && state.study.n_slices === study.n_slices;
      state.study = { ...study, slices: study.slices.map((s) => s.png) };
      state.images.clear();
      if (!keep) {
        clearResult();
        state.index = Math.floor(study.n_slices / 2);
      }
      el.canvas.width = study.width;
      el.canvas.height = study.height;
      el.slider.max = String(study.n_slices - 1);
      el.slider.disabled = study.n_slices < 2;
      el.emptyHint.hidden = true;
      setBusy(null);
      el.status.textContent = `${study.n_slices} slice(s), ${study.modality || "image"}`;
      await showSlice(state.index);
      el.canvas.dataset.window = form.get("window");
    } catch (err) {
      setBusy(null);
      showError(err.message);
    }
  }

  function sliceImage(index) {
    let image = state.images.get(index);
    if (!image) {
      image = new Image();
      image.src = `data:image/png;base64,${state.study.slices[index]}`;
      state.images.set(index, image);
    }
    return image.decode().then(() => image);
  }

  async function showSlice(index) {
    if (!state.study) return;
    const n = state.study.n_slices;
    index = Math.max(0, Math.min(n - 1, index));
    state.index = index;
    el.slider.value = String(index);
    el.sliceLabel.textContent = `slice ${index + 1} / ${n}`;
    const image = await sliceImage(index);
    if (state.index !== index) return; // scrolled on meanwhile
    await prepareMasks(index);
    if (state.index !== index) return;
    state.image = image;
    renderResult();
    draw();
  }

  // -- drawing ------------------------------------------------------------------------------

  function colorOf(classId) {
    const colors = (state.model && state.model.colors) || {};
    return colors[classId === null || classId === undefined ? "null" : String(classId)] || "#ffff00";
  }

  function rgbOf(hex) {
    const v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

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
      for (let p = 0; p < data.data.length; p += 4) {
        const on = data.data[p] > 127;
        data.data[p] = r;
        data.data[p + 1] = g;
        data.data[p + 2] = b;
        data.data[p + 3] = on ? 255 : 0;
      }
      c.putImageData(data, 0, 0);
      state.masks.set(key, { canvas, data: data.data, width: canvas.width });
    });
    await Promise.all(jobs);
  }

  function draw() {
    const { width, height } = el.canvas;
    ctx.clearRect(0, 0, width, height);
    if (state.image) ctx.drawImage(state.image, 0, 0, width, height);
    el.canvas.dataset.sliceIndex = String(state.index);
    const pred = state.bySlice.get(state.index);
    const boxes = [];
    let masks = 0;
    if (pred) {
      pred.spans.forEach((span, i) => {
        const mask = state.masks.get(`${state.index}:${i}`);
        if (!mask) return;
        masks += 1;
        ctx.globalAlpha = state.highlight === i ? 0.65 : state.highlight === null ? 0.35 : 0.2;
        ctx.drawImage(mask.canvas, 0, 0, width, height);
        ctx.globalAlpha = 1;
      });
      const line = Math.max(2, Math.round(width / 256));
      pred.spans.forEach((span, i) => {
        const color = colorOf(span.class_id);
        for (const box of span.boxes) {
          const x1 = Math.round(box[0] * width);
          const y1 = Math.round(box[1] * height);
          const x2 = Math.round(box[2] * width);
          const y2 = Math.round(box[3] * height);
          const active = state.highlight === i;
          if (active) {
            ctx.fillStyle = color;
            ctx.globalAlpha = 0.2;
            ctx.fillRect(x1, y1, x2 - x1, y2 - y1);
            ctx.globalAlpha = 1;
          }
          ctx.strokeStyle = color;
          ctx.lineWidth = active ? line * 2 : line;
          ctx.strokeRect(x1, y1, Math.max(1, x2 - x1), Math.max(1, y2 - y1));
          boxes.push({ span: i, class_id: span.class_id, color, x1, y1, x2, y2, line });
        }
      });
    }
    state.drawnBoxes = boxes;
    el.canvas.dataset.boxes = JSON.stringify(boxes);
    el.canvas.dataset.masks = String(masks);
    el.canvas.dataset.highlight = state.highlight === null ? "" : String(state.highlight);
  }

  // -- results ------------------------------------------------------------------------------

  function clearResult() {
    state.response = null;
    state.bySlice.clear();
    state.masks.clear();
    state.highlight = null;
    state.pinned = null;
    el.download.disabled = true;
    renderResult();
  }

  function renderResult() {
    const pred = state.bySlice.get(state.index);
    el.legend.replaceChildren();
    el.problems.hidden = true;
    if (!pred) {
      el.report.dataset.state = "empty";
      el.report.dataset.spans = "0";
      el.report.replaceChildren(noResultMessage());
      return;
    }
    el.report.dataset.state = "result";
    el.report.dataset.spans = String(pred.spans.length);
    el.report.lang = pred.language;
    const chars = Array.from(pred.text);
    const parts = [];
    let pos = 0;
    pred.spans.forEach((span, i) => {
      parts.push(document.createTextNode(chars.slice(pos, span.start).join("")));
      const mark = document.createElement("mark");
      mark.className = "phrase";
      mark.textContent = chars.slice(span.start, span.end).join("");
      mark.dataset.spanIndex = String(i);
      mark.dataset.classId = span.class_id === null ? "" : String(span.class_id);
      mark.dataset.active = "false";
      mark.style.setProperty("--c", colorOf(span.class_id));
      mark.title = span.display_name || span.label;
      mark.addEventListener("mouseenter", () => setHighlight(i));
      mark.addEventListener("mouseleave", () => setHighlight(state.pinned));
      mark.addEventListener("click", () => {
        state.pinned = state.pinned === i ? null : i;
        setHighlight(state.pinned);
      });
      parts.push(mark);
      pos = span.end;
    });
    parts.push(document.createTextNode(chars.slice(pos).join("")));
    el.report.replaceChildren(...parts);
    renderLegend(pred);
    if (pred.problems && pred.problems.length) {
      el.problems.hidden = false;
      el.problems.textContent = `Decoding notes: ${pred.problems.join("; ")}`;
    }
  }

  function noResultMessage() {
    const box = document.createElement("span");
    if (!state.bySlice.size) {
      box.textContent = state.study ? "Run the model to see a result." : "No study loaded.";
      return box;
    }
    box.append(`No result for slice ${state.index + 1}. Results: `);
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
    const names = (state.model && state.model.display_names[pred.language]) || {};
    const seen = new Map();
    pred.spans.forEach((span, i) => {
      const key = span.class_id === null ? `label:${span.label}` : String(span.class_id);
      if (!seen.has(key)) {
        const name = (span.class_id !== null && names[span.class_id]) || span.display_name;
        seen.set(key, { name: name || span.label, classId: span.class_id, spans: [] });
      }
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
    for (const mark of el.report.querySelectorAll(".phrase")) {
      mark.dataset.active = String(Number(mark.dataset.spanIndex) === state.highlight);
    }
    for (const item of el.legend.children) {
      const spans = item.dataset.spans.split(",").map(Number);
      item.dataset.active = String(spans.includes(state.highlight));
    }
    draw();
  }

  // The span under a canvas point: the smallest box containing it, else a mask hit.
  function spanAt(x, y) {
    let best = null;
    let bestArea = Infinity;
    for (const b of state.drawnBoxes) {
      const pad = b.line;
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
    if (!pred) return null;
    for (let i = 0; i < pred.spans.length; i += 1) {
      const mask = state.masks.get(`${state.index}:${i}`);
      if (!mask) continue;
      const scale = mask.width / el.canvas.width;
      const mx = Math.floor(x * scale);
      const my = Math.floor(y * scale);
      if (mask.data[(my * mask.width + mx) * 4 + 3] > 0) return i;
    }
    return null;
  }

  el.canvas.addEventListener("mousemove", (event) => {
    if (!state.bySlice.has(state.index)) return;
    const rect = el.canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * el.canvas.width;
    const y = ((event.clientY - rect.top) / rect.height) * el.canvas.height;
    const hit = spanAt(x, y);
    const next = hit === null ? state.pinned : hit;
    if (next !== state.highlight) setHighlight(next);
  });
  el.canvas.addEventListener("mouseleave", () => setHighlight(state.pinned));

  async function run() {
    if (!state.study) return;
    showError(null);
    const all = el.scopeAll.checked;
    setBusy(all ? `Running on ${state.study.n_slices} slices…` : "Running…");
    try {
      const form = studyForm();
      form.append("task", el.taskSelect.value);
      form.append("language", el.languageSelect.value);
      form.append("slice", all ? "all" : String(state.index));
      form.append("max_new_tokens", el.maxTokens.value || "100");
      const task = el.taskSelect.value;
      if (task === "vqa") form.append("question", el.questionInput.value);
      if (task === "detect" || task === "segment") {
        form.append("structures", el.structuresInput.value);
      }
      if (el.clinicalInput.value.trim() && !["vqa", "detect", "segment"].includes(task)) {
        form.append("clinical_info", el.clinicalInput.value);
      }
      const response = await api("/v1/predict", { method: "POST", body: form });
      clearResult();
      state.response = response;
      for (const pred of response.predictions) {
        state.bySlice.set(pred.slice_index === null ? 0 : pred.slice_index, pred);
      }
      el.download.disabled = false;
      setBusy(null);
      const n = response.predictions.length;
      el.status.dataset.state = "done";
      el.status.textContent = `Done: ${n} prediction(s), request ${response.request_id}`;
      const first = response.predictions[0];
      const target = all || !first || first.slice_index === null ? state.index : first.slice_index;
      await showSlice(target);
    } catch (err) {
      setBusy(null);
      showError(err.message);
    }
  }

  function downloadJson() {
    if (!state.response) return;
    const blob = new Blob([JSON.stringify(state.response, null, 2)], {
      type: "application/json",
    });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `radgrounder-${state.response.request_id}.json`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  // -- input: files, drag and drop, scrolling ----------------------------------------------

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

  el.fileInput.addEventListener("change", () => loadStudy([...el.fileInput.files]));
  el.windowSelect.addEventListener("change", () => loadStudy());
  el.taskSelect.addEventListener("change", updateTaskFields);
  el.runButton.addEventListener("click", run);
  el.download.addEventListener("click", downloadJson);
  el.slider.addEventListener("input", () => showSlice(Number(el.slider.value)));
  el.canvas.addEventListener(
    "wheel",
    (event) => {
      if (!state.study) return;
      event.preventDefault();
      showSlice(state.index + (event.deltaY > 0 ? 1 : -1));
    },
    { passive: false },
  );
  document.addEventListener("keydown", (event) => {
    if (!state.study || event.target.closest("input, select, textarea")) return;
    if (event.key === "ArrowUp" || event.key === "ArrowRight") showSlice(state.index + 1);
    if (event.key === "ArrowDown" || event.key === "ArrowLeft") showSlice(state.index - 1);
  });
  for (const name of ["dragenter", "dragover"]) {
    el.dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      el.dropZone.dataset.state = "over";
    });
  }
  el.dropZone.addEventListener("dragleave", () => { el.dropZone.dataset.state = "idle"; });
  el.dropZone.addEventListener("drop", async (event) => {
    event.preventDefault();
    el.dropZone.dataset.state = "idle";
    try {
      loadStudy(await droppedFiles(event.dataTransfer));
    } catch (err) {
      showError(`cannot read the dropped files (${err.message})`);
    }
  });

  renderResult();
  loadModel();
})();
