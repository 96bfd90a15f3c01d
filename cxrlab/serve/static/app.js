// cxrlab page: upload a radiograph, show probabilities and the Grad-CAM overlay. No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
let previewUrl = null;

function authHeaders() {
  const t = $("token").value.trim();
  if (t) sessionStorage.setItem("cxrlab-token", t);
  return t ? { Authorization: "Bearer " + t } : {};
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = false;
}

async function errorMessage(resp) {
  let text = "";
  try {
    const body = await resp.json();
    text = body.error || JSON.stringify(body);
  } catch (e) {
    text = resp.statusText || "no details";
  }
  if (resp.status === 401) { $("token-box").open = true; text += " (enter the access token above)"; }
  if (resp.status === 413) text = "File too large: " + text;
  return `Error ${resp.status}: ${text}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/api/model", { headers: authHeaders() });
    if (!resp.ok) { $("model-info").textContent = "model info unavailable (" + resp.status + ")"; return; }
    const m = await resp.json();
    $("model-info").textContent = `${m.model_id} - ${m.class_names.join(", ")} - ${m.img_size}px`;
  } catch (e) {
    $("model-info").textContent = "server unreachable";
  }
}

function renderBars(probs, predicted) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probs).sort((a, b) => b[1] - a[1])) {
    const row = document.createElement("div");
    row.className = "bar" + (name === predicted ? " top" : "");
    row.dataset.cls = name;
    const label = document.createElement("span"); label.className = "name"; label.textContent = name; label.title = name;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span"); value.className = "value"; value.textContent = (100 * p).toFixed(1) + "%";
    row.append(label, track, value);
    bars.appendChild(row);
  }
}

async function analyse(file) {
  $("error").hidden = true;
  if (!file) return;
  $("results").hidden = true;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview-note").hidden = true;
  $("status").textContent = `Analysing ${file.name} (${(file.size / 1024).toFixed(0)} KB)...`;
  const form = new FormData();
  form.append("file", file);
  try {
    const resp = await fetch("/api/explain?format=json", { method: "POST", body: form, headers: authHeaders() });
    if (!resp.ok) { showError(await errorMessage(resp)); $("status").textContent = ""; return; }
    const r = await resp.json();
    $("predicted").textContent = r.predicted;
    $("sha").textContent = r.sha256;
    $("target").textContent = r.target && r.target !== r.predicted ? `(for ${r.target})` : `(for ${r.predicted})`;
    renderBars(r.probabilities, r.predicted);
    $("base").src = "data:image/png;base64," + r.image_png_base64;
    $("overlay").src = "data:image/png;base64," + r.heatmap_png_base64;
    $("results").hidden = false;
    $("status").textContent = `${file.name}: ${r.predicted} (model ${r.model})`;
  } catch (e) {
    showError("Could not reach the server: " + e.message);
    $("status").textContent = "";
  }
}

function setOpacity() {
  const v = $("opacity").value;
  $("overlay").style.opacity = v / 100;
  $("opacity-value").textContent = v + "%";
}

function init() {
  $("token").value = sessionStorage.getItem("cxrlab-token") || "";
  $("file").addEventListener("change", (e) => analyse(e.target.files[0]));
  $("preview").addEventListener("error", () => { if ($("preview").src) $("preview-note").hidden = false; });
  $("opacity").addEventListener("input", setOpacity);
  const drop = $("drop");
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
  setOpacity();
  loadModel();
}

init();
