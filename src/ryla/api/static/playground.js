// ryla playground: one page, no build step, no external resources (the CSP forbids them).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "flux-dev", lastSeed: null, reference: null, loras: [], history: [] };
const HISTORY_SIZE = 8;

function headers() {
  const h = { "Content-Type": "application/json", "Accept": "application/json" };
  const key = sessionStorage.getItem("ryla-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.node_errors) {
      const details = Object.entries(body.node_errors).flatMap(([id, e]) => e.errors.map((x) => `node ${id}: ${x.message}`));
      return [body.error.message, ...details].join("; ");
    }
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

function setMode(mode) {
  state.mode = mode;
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.mode === mode));
  $("lora-panel").hidden = mode !== "flux-lora";
  $("identity-panel").hidden = mode !== "flux-instantid";
  if (mode === "flux-lora") loadLoras();
  showError("");
}

async function loadLoras() {
  try {
    const r = await fetch("/loras", { headers: headers() });
    if (!r.ok) { showError(await errorMessage(r)); return; }
    state.loras = (await r.json()).loras;
    const select = $("lora-id");
    select.replaceChildren(...state.loras.map((l) => new Option(l.id, l.id)));
    if (!state.loras.length) select.replaceChildren(new Option("no LoRAs on this server", ""));
    showTrigger();
  } catch (e) { showError("cannot reach the server: " + e.message); }
}

function showTrigger() {
  const lora = state.loras.find((l) => l.id === $("lora-id").value);
  $("trigger-word").textContent = (lora && lora.trigger_word) || "–";
}

function readReference(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.reference = reader.result; // a data: URL, which the API accepts as is
    const preview = $("reference-preview");
    preview.src = reader.result;
    preview.hidden = false;
  };
  reader.readAsDataURL(file);
}

function requestBody() {
  const seedText = $("seed").value.trim();
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: Number($("width").value),
    height: Number($("height").value),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    output_format: "png",
  };
  if (seedText && seedText !== "random") body.seed = Number(seedText);
  if (state.mode === "flux-lora") {
    body.lora_id = $("lora-id").value;
    body.lora_strength = Number($("lora-strength").value);
  }
  if (state.mode === "flux-instantid") {
    body.reference_image = state.reference || "";
    body.instantid_strength = Number($("instantid-strength").value);
    body.controlnet_strength = Number($("controlnet-strength").value);
  }
  return body;
}

function show(entry) {
  const img = $("result");
  img.src = entry.src;
  img.hidden = false;
  $("result-info").textContent = `seed ${entry.seed} · ${entry.seconds.toFixed(2)} s · ${entry.mode}`;
}

function addToHistory(entry) {
  state.history.unshift(entry);
  state.history = state.history.slice(0, HISTORY_SIZE);
  $("history").replaceChildren(...state.history.map((h) => {
    const thumb = new Image();
    thumb.src = h.src;
    thumb.alt = `seed ${h.seed}`;
    thumb.title = `seed ${h.seed}: ${h.prompt}`;
    thumb.addEventListener("click", () => show(h));
    return thumb;
  }));
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (state.mode === "flux-instantid" && !state.reference) { showError("reference_image: drop a face photo first"); return; }
  const button = $("generate");
  button.disabled = true;
  button.textContent = "Generating…";
  try {
    const body = requestBody();
    const r = await fetch("/" + state.mode, { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) { showError(await errorMessage(r)); return; }
    const data = await r.json();
    const image = data.images[0];
    const entry = { src: `data:image/${image.format};base64,${image.data}`, seed: image.seed,
                    seconds: data.timings.total_s, mode: state.mode, prompt: body.prompt };
    state.lastSeed = image.seed;
    show(entry);
    addToHistory(entry);
  } catch (e) {
    showError("request failed: " + e.message);
  } finally {
    button.disabled = false;
    button.textContent = "Generate";
  }
}

async function loadHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const badge = $("model-set");
    badge.textContent = health.model_set === "tiny" ? "tiny test model (noise)" : "FLUX.1-dev";
    badge.classList.toggle("tiny", health.model_set === "tiny");
  } catch (_) { /* the page still works; the badge stays empty */ }
}

function bindSlider(id) {
  const out = $(id + "-value");
  $(id).addEventListener("input", () => { out.textContent = Number($(id).value).toFixed(2); });
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("ryla-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("ryla-api-key", $("api-key").value));
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => setMode(t.dataset.mode)));
  $("size").addEventListener("change", () => {
    const [w, h] = $("size").value.split("x");
    if (h) { $("width").value = w; $("height").value = h; }
  });
  $("seed-random").addEventListener("click", () => { $("seed").value = "random"; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("lora-id").addEventListener("change", showTrigger);
  ["lora-strength", "instantid-strength", "controlnet-strength"].forEach(bindSlider);
  const drop = $("drop");
  drop.addEventListener("click", (e) => { if (e.target !== $("reference")) $("reference").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); readReference(e.dataTransfer.files[0]); });
  $("reference").addEventListener("change", () => readReference($("reference").files[0]));
  $("form").addEventListener("submit", generate);
  loadHealth();
});
