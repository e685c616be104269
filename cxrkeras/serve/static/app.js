// cxrkeras serve: the page's only script. It talks to this server only (/api/model, /api/analyze) and writes
// every text it shows with textContent, never as HTML (file names come from the user).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let selected = [];
  let patientValues = [];  // per chosen file {age, sex, view}, for a model that takes them
  let lastReport = null;
  let model = null;
  let thresholdNote = "";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const pct = (p) => (100 * p).toFixed(1) + " %";

  async function loadModel() {
    try {
      const response = await fetch("/api/model");
      model = await response.json();
    } catch (err) {
      $("model-line").textContent = "the model information could not be read: " + err;
      return;
    }
    $("model-line").textContent = `model ${model.name} · version ${model.version} · ${model.labels.length} labels`;
    const notice = model.notice.replace(/^Research tool, not a medical device: /, "");
    $("notice-text").textContent = notice.charAt(0).toUpperCase() + notice.slice(1);
    if (model.warning) {
      $("model-warning").textContent = "Thresholds: " + model.warning;
      $("model-warning").hidden = false;
    }
    if (model.patient_inputs) {
      $("patient-hint").textContent = "This model also takes each patient's age (years), sex " +
        `(${model.patient_inputs.sex.join("/")}) and view position (${model.patient_inputs.view.join("/")}): ` +
        `give them beside each file (${model.patient_inputs.note}).`;
      $("patient-hint").hidden = false;
    }
    const select = $("label");
    for (const label of model.labels) select.append(el("option", { value: label }, label));
    $("top-k").max = String(model.labels.length);
    const info = model.threshold_info || {};
    const method = info.method === "youden" ? "Youden's J" : info.method === "f1" ? "F1-max" : info.method;
    let how;
    if (model.warning || info.source === "default") how = "threshold 0.5 for every label (no evaluation)";
    else if (info.method) how = `${method} thresholds chosen on the ${info.chosen_on || "validation"} split`;
    else how = "thresholds from the run's evaluation";
    thresholdNote = how;
    const heat = model.heatmaps ? "Grad-CAM from the Keras model" : "no heatmaps: " + model.heatmaps_unavailable;
    $("model-details").textContent = `Served from the ${model.served_from}; ${how}; ${heat}. ` +
      `Up to ${model.limits.max_images} files and ${(model.limits.max_upload_bytes / 1048576).toFixed(0)} MiB ` +
      `per upload. cxrkeras ${model.cxrkeras}.`;
    updateButton();
  }

  function patientFields(i) {
    const p = model.patient_inputs;
    const values = patientValues[i];
    const name = selected[i].name;
    const age = el("input", { type: "number", min: "0", max: "150", step: "any", class: "age", placeholder: "age",
      "aria-label": `age of the patient of ${name}` });
    age.value = values.age;
    age.addEventListener("input", () => { values.age = age.value; });
    const choice = (field, options) => {
      const s = el("select", { class: field, "aria-label": `${field} of ${name}` }, el("option", { value: "" }, field),
        ...options.map((o) => el("option", { value: o }, o)));
      s.value = values[field];
      s.addEventListener("change", () => { values[field] = s.value; });
      return s;
    };
    return el("span", { class: "patient" }, age, choice("sex", p.sex), choice("view", p.view));
  }

  function updateButton() {
    $("analyse").disabled = !model || selected.length === 0;
    const list = $("chosen");
    const withPatient = model && model.patient_inputs;
    list.replaceChildren(...selected.map((f, i) => el("li", {}, `${f.name} (${(f.size / 1024).toFixed(0)} kB)`,
      withPatient ? patientFields(i) : null)));
  }

  function choose(files) {
    selected = Array.from(files || []);
    patientValues = selected.map(() => ({ age: "", sex: "", view: "" }));
    updateButton();
  }

  function renderTable(result) {
    const body = el("tbody");
    for (const row of result.table) {
      const bar = el("div", { class: "bar" }, el("span", { class: "fill" }), el("span", { class: "tick" }));
      bar.firstChild.style.width = (100 * row.probability).toFixed(1) + "%";
      bar.lastChild.style.left = `calc(${(100 * row.threshold).toFixed(1)}% - 1px)`;
      bar.title = `probability ${pct(row.probability)}, threshold ${pct(row.threshold)}`;
      body.append(el("tr", { class: row.finding ? "finding" : "" },
        el("td", { class: "label" }, row.label),
        el("td", { class: "num" }, row.probability.toFixed(3)),
        el("td", {}, bar),
        el("td", { class: "num" }, row.threshold.toFixed(3)),
        el("td", { class: row.finding ? "yes" : "no" }, row.finding ? "yes" : "no")));
    }
    const head = el("thead", {}, el("tr", {}, el("th", {}, "label"), el("th", { class: "num" }, "probability"),
      el("th", {}, ""), el("th", { class: "num" }, "threshold"), el("th", {}, "finding")));
    return el("table", { class: "labels" }, head, body, el("caption", {}, "Sorted by probability. A finding is " +
      "a probability at or over its label's threshold" + (thresholdNote ? ` (${thresholdNote}).` : ".")));
  }

  function renderHeatmaps(result) {
    const box = el("div", { class: "heatmaps" }, el("h3", {}, "Where the model looked (Grad-CAM)"));
    if (result.heatmaps.length === 0) {
      box.append(el("p", { class: "none" }, result.heatmaps_unavailable
        ? "No heatmaps: " + result.heatmaps_unavailable : "No heatmap asked for."));
      return box;
    }
    const row = el("div", { class: "row" });
    for (const h of result.heatmaps) {
      const img = el("img", { alt: `Grad-CAM heatmap for ${h.label}`, class: "heatmap" });
      img.src = h.image;
      row.append(el("figure", {}, img, el("figcaption", {},
        `${h.label}: p = ${h.probability.toFixed(3)}` + (h.empty ? " (no positive evidence at this layer)" : ""))));
    }
    box.append(row);
    return box;
  }

  function renderResult(result) {
    if (result.error) {
      return el("article", { class: "card result failed" }, el("h2", {}, result.file),
        el("p", {}, "Not analysed: " + result.error));
    }
    const n = result.findings.length;
    const badge = el("span", { class: "badge " + (n ? "pos" : "neg") },
      n ? `${n} finding${n > 1 ? "s" : ""}: ${result.findings.join(", ")}` : "no finding over its threshold");
    const img = el("img", { alt: "uploaded image " + result.file });
    img.src = result.preview;
    const patient = result.patient ? el("p", { class: "patient-line" },
      `age ${result.patient.age || "unknown"} · sex ${result.patient.sex || "unknown"} · ` +
      `view ${result.patient.view || "unknown"}`) : null;
    return el("article", { class: "card result" },
      el("h2", {}, result.file, el("span", { class: "dims" }, `${result.width} × ${result.height} px`), badge),
      patient,
      el("div", { class: "cols" },
        el("figure", { class: "preview" }, img, el("figcaption", {}, "The model sees the central square, resized.")),
        renderTable(result)),
      renderHeatmaps(result));
  }

  function withoutImages(report) {
    const copy = JSON.parse(JSON.stringify(report));
    for (const r of copy.results) {
      delete r.preview;
      for (const h of r.heatmaps || []) delete h.image;
    }
    return copy;
  }

  function tooMuch() {
    const total = selected.reduce((sum, f) => sum + f.size, 0);
    const limit = model.limits.max_upload_bytes;
    if (selected.length > model.limits.max_images) {
      return `${selected.length} files chosen; the server takes at most ${model.limits.max_images} at once`;
    }
    if (total + 1024 * selected.length > limit) {  // the form adds about a kB per file
      return `these files are ${(total / 1048576).toFixed(1)} MiB together, over the server's limit of ` +
        `${(limit / 1048576).toFixed(1)} MiB per upload (--max-upload-mb): choose fewer or smaller files`;
    }
    return null;
  }

  async function analyse() {
    const refusal = tooMuch();
    if (refusal) {
      $("status").textContent = refusal;
      return;
    }
    const form = new FormData();
    selected.forEach((f, i) => {
      form.append("files", f, f.name);
      if (model.patient_inputs) {
        for (const field of model.patient_inputs.fields) form.append(field, patientValues[i][field]);
      }
    });
    const mode = document.querySelector("input[name=heatmap-mode]:checked").value;
    if (mode === "label") form.append("label", $("label").value);
    else form.append("top_k", $("top-k").value || "0");
    $("analyse").disabled = true;
    $("status").textContent = `analysing ${selected.length} file${selected.length > 1 ? "s" : ""}…`;
    let doc;
    try {
      const response = await fetch("/api/analyze", { method: "POST", body: form });
      doc = await response.json();
      if (!response.ok && !doc.results) throw new Error(doc.error || response.statusText);
    } catch (err) {
      $("status").textContent = "failed: " + err.message;
      updateButton();
      return;
    }
    $("results").replaceChildren(...doc.results.map(renderResult));
    const ok = doc.results.filter((r) => !r.error).length;
    $("status").textContent = `${ok} of ${doc.results.length} analysed`;
    lastReport = withoutImages(doc);
    $("actions").hidden = false;
    updateButton();
  }

  function download() {
    if (!lastReport) return;
    const blob = new Blob([JSON.stringify(lastReport, null, 2)], { type: "application/json" });
    const a = el("a", { href: URL.createObjectURL(blob), download: "cxrkeras-report.json" });
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const drop = $("drop");
    $("files").addEventListener("change", (e) => choose(e.target.files));
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
    }
    drop.addEventListener("drop", (e) => choose(e.dataTransfer.files));
    $("label").addEventListener("change", () => { document.querySelector("input[value=label]").checked = true; });
    $("top-k").addEventListener("input", () => { document.querySelector("input[value=top]").checked = true; });
    $("analyse").addEventListener("click", analyse);
    $("download").addEventListener("click", download);
    loadModel();
  });
})();
