// cxrlab page: upload a radiograph, show probabilities and the Grad-CAM overlay. No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
let previewUrl = null;
let modelInfo = null; // /api/model once it answered; its `gradcam` says whether /api/explain can work

function authHeaders() {
  const t = $("token").value.trim();
  if (t) sessionStorage.setItem("cxrlab-token", t);
  return t ? { Authorization: "Bearer " + t } : {};
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = false;
}

function askForToken() {
  $("token-box").open = true;
  $("token").focus();
}

async function errorMessage(resp) {
  let text = "";
  try {
    const body = await resp.json();
    text = body.error || JSON.stringify(body);
  } catch (e) {
    text = resp.statusText || "no details";
  }
  if (resp.status === 401) { askForToken(); text += " (enter the access token above)"; }
  if (resp.status === 413) text = "File too large: " + text;
  return `Error ${resp.status}: ${text}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/api/model", { headers: authHeaders() });
    if (resp.status === 401) {
      modelInfo = null;
      $("model-info").textContent = "this server needs an access token: enter it under \"Access token\"";
      askForToken();
      return;
    }
    if (!resp.ok) { $("model-info").textContent = "model info unavailable (" + resp.status + ")"; return; }
    modelInfo = await resp.json();
    const cam = modelInfo.gradcam === false ? " - no Grad-CAM" : "";
    $("model-info").textContent = `${modelInfo.model_id} - ${modelInfo.class_names.join(", ")} - ${modelInfo.img_size}px${cam}`;
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

function renderWarnings(warnings) {
  const list = $("warnings");
  list.replaceChildren();
  for (const w of warnings || []) {
    const item = document.createElement("li");
    item.textContent = w;
    list.appendChild(item);
  }
  $("warnings-box").hidden = list.childElementCount === 0;
}

// Grad-CAM when the server can do it, else (ONNX model, or explain refused with 400) the prediction alone.
async function requestAnalysis(file) {
  const post = (url) => {
    const form = new FormData();
    form.append("file", file);
    return fetch(url, { method: "POST", body: form, headers: authHeaders() });
  };
  let camNote = modelInfo && modelInfo.gradcam === false ? modelInfo.gradcam_unavailable : null;
  if (!camNote) {
    const resp = await post("/api/explain?format=json");
    if (resp.status !== 400) return { resp, camNote: null };
    camNote = (await resp.json().catch(() => ({}))).error || "Grad-CAM is not available for this model";
  }
  return { resp: await post("/api/predict"), camNote };
}

function renderHeatmap(r, camNote) {
  const hasCam = !camNote;
  $("stack").hidden = !hasCam;
  $("opacity-label").hidden = !hasCam;
  const note = hasCam ? r.note || "" : "No heatmap (the prediction is complete): " + camNote; // r.note: ensembles
  $("cam-note").hidden = !note;
  $("cam-note").textContent = note;
  $("preview-note").textContent = "This file type cannot be previewed by the browser" +
    (hasCam ? "; the model input is shown with the heatmap." : ".");
  $("target").textContent = !hasCam ? "" : r.target && r.target !== r.predicted ? `(for ${r.target})` : `(for ${r.predicted})`;
  if (hasCam) {
    $("base").src = "data:image/png;base64," + r.image_png_base64;
    $("overlay").src = "data:image/png;base64," + r.heatmap_png_base64;
  } else {
    $("base").removeAttribute("src");
    $("overlay").removeAttribute("src");
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
  try {
    if (!modelInfo) await loadModel(); // e.g. the token was entered after the page loaded
    const { resp, camNote } = await requestAnalysis(file);
    if (!resp.ok) { showError(await errorMessage(resp)); $("status").textContent = ""; return; }
    const r = await resp.json();
    $("predicted").textContent = r.predicted;
    $("sha").textContent = r.sha256;
    renderBars(r.probabilities, r.predicted);
    renderWarnings(r.warnings);
    renderHeatmap(r, camNote);
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
  $("token").addEventListener("change", loadModel); // a new token: ask for the model info again
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") loadModel(); });
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = ""; // choosing the same file again fires `change` again
    analyse(file);
  });
  $("preview").addEventListener("error", () => { if ($("preview").src) $("preview-note").hidden = false; });
  $("opacity").addEventListener("input", setOpacity);
  const drop = $("drop");
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
  drop.addEventListener("keydown", (e) => { // the zone itself, not the token field inside it
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); $("file").click(); }
  });
  setOpacity();
  loadModel();
}

init();
