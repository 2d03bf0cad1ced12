"use strict";
// The page talks only to this server: /v1/model for the header, /v1/explain for each image.
const $ = (id) => document.getElementById(id);

function show(el, visible) { el.hidden = !visible; }

let coverage = null; // the model's conformal coverage, from /v1/model (null: no prediction sets)

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    const card = await r.json();
    const acc = card.test_metrics && card.test_metrics.accuracy;
    const sets = card.prediction_sets;
    coverage = sets && typeof sets.coverage === "number" ? sets.coverage : null;
    $("model-line").textContent = `${card.name} (version ${card.version}, runtime ${card.runtime}) · classes: ${card.classes.join(", ")}`
      + (typeof acc === "number" ? ` · test accuracy ${(acc * 100).toFixed(1)}% (n=${card.test_metrics.n})` : "")
      + (coverage !== null ? ` · prediction sets at ${+(coverage * 100).toFixed(2)}% coverage` : "");
  } catch (e) {
    $("model-line").textContent = "model card unavailable";
  }
}

function renderBars(probabilities, label) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probabilities).sort((a, b) => b[1] - a[1])) {
    const row = document.createElement("div");
    row.className = "bar" + (name === label ? " top" : "");
    const nameEl = document.createElement("span");
    nameEl.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(p * 100).toFixed(1)}%`;
    row.append(nameEl, track, value);
    bars.appendChild(row);
  }
}

function renderResult(data) {
  $("label").textContent = data.label;
  renderBars(data.probabilities, data.label);
  const set = data.prediction_set;
  if (Array.isArray(set)) {
    $("prediction-set").textContent = set.length ? `{${set.join(", ")}}` : "{} (empty)";
    $("set-coverage").textContent = coverage !== null ? `(${+(coverage * 100).toFixed(2)}% coverage)` : "";
  }
  show($("set-line"), Array.isArray(set));
  if (data.refer) {
    $("refer").textContent = `Refer to a radiologist: ${data.refer_reason || "the model cannot decide this image"}`;
  }
  show($("refer"), Boolean(data.refer));
  const ood = data.ood;
  const notes = [];
  if (ood && ood.flagged) {
    notes.push(`Warning: this image is unlike the images the model was trained on `
      + `(out-of-distribution score ${ood.score.toFixed(1)} > threshold ${ood.threshold.toFixed(1)}). `
      + `The prediction is not meaningful for it.`);
  }
  for (const warning of data.warnings || []) notes.push(`Warning: ${warning}.`);
  if (notes.length) {
    $("ood-warning").textContent = notes.join(" ");
    show($("ood-warning"), true);
  }
  $("cam-image").src = "data:image/png;base64," + data.image_png;
  $("cam-heat").src = "data:image/png;base64," + data.heatmap_png;
  $("cam-caption").textContent = `${data.method} map for class "${data.target}"`;
  $("timing").textContent = `${data.image.width}×${data.image.height} ${data.image.format} · ${data.timing_ms.toFixed(0)} ms`;
  show($("result"), true);
}

async function analyse(file) {
  show($("error"), false);
  show($("refer"), false);
  show($("ood-warning"), false);
  show($("result"), false);
  $("file-name").textContent = `${file.name} (${(file.size / 1024).toFixed(0)} KB)`;
  const preview = $("preview");
  if (/^image\/(png|jpeg)$/.test(file.type)) {
    preview.src = URL.createObjectURL(file);
    show(preview, true);
  } else {
    show(preview, false); // DICOM: the browser cannot draw it; the server returns the decoded image
  }
  $("status").textContent = "Analysing…";
  const form = new FormData();
  form.append("file", file);
  form.append("method", $("method").value);
  try {
    const r = await fetch("/v1/explain", { method: "POST", body: form });
    const data = await r.json().catch(() => ({ error: `server answered ${r.status}` }));
    if (!r.ok) throw new Error(data.error || `server answered ${r.status}`);
    $("status").textContent = "Done.";
    renderResult(data);
  } catch (e) {
    $("status").textContent = "";
    $("error").textContent = `Could not analyse ${file.name}: ${e.message}`;
    show($("error"), true);
  }
}

function setup() {
  const drop = $("drop");
  const input = $("file-input");
  input.addEventListener("change", () => { if (input.files.length) analyse(input.files[0]); });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  const opacity = $("opacity");
  const apply = () => { $("cam-heat").style.opacity = opacity.value / 100; };
  opacity.addEventListener("input", apply);
  apply();
  loadModel();
}

setup();
