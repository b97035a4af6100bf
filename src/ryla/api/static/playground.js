// ryla playground: one page, no build step, no external resources (the CSP forbids them).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "flux-dev", lastSeed: null, reference: null, loras: [], history: [], job: null, lastRequest: null };
const MAX_SEED = 18446744073709551615n;
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

function seedText() {
  const text = $("seed").value.trim();
  if (!text || text === "random") return null;
  if (!/^\d{1,20}$/.test(text) || BigInt(text) > MAX_SEED) throw new Error("seed: a whole number from 0 to " + MAX_SEED + ", or random");
  return text;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: Number($("width").value),
    height: Number($("height").value),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    output_format: "png",
  };
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

// JSON with the seed written as its digits: a JavaScript number would round seeds above 2^53.
function toJson(body, seed) {
  const text = JSON.stringify(body);
  return seed === null ? text : text.slice(0, -1) + ',"seed":' + seed + "}";
}

function show(entry) {
  const img = $("result");
  img.src = entry.src;
  img.hidden = false;
  $("empty-hint").hidden = true;
  $("result-info").textContent = `seed ${entry.seed} · ${entry.seconds.toFixed(2)} s · ${entry.mode}`;
  const download = $("download");
  download.href = entry.src;
  download.download = `ryla-${entry.mode}-${entry.seed}.png`;
  $("result-actions").hidden = false;
  state.shown = entry;
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

function setProgress(text, value, max) {
  $("progress-box").hidden = false;
  $("progress-text").textContent = text;
  const bar = $("progress");
  if (max) { bar.max = max; bar.value = value; } else { bar.removeAttribute("value"); }
}

// The job's server-sent events, read with fetch (EventSource cannot send the API key).
async function followEvents(url, onEvent) {
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) throw new Error(await errorMessage(r));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const final = onEvent(name, JSON.parse(data));
      if (final) { reader.cancel(); return final; }
    }
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (state.mode === "flux-instantid" && !state.reference) { showError("reference_image: drop a face photo first"); return; }
  let seed;
  try { seed = seedText(); } catch (e) { showError(e.message); return; }
  const button = $("generate");
  button.disabled = true;
  button.textContent = "Generating…";
  const started = performance.now();
  try {
    const body = requestBody();
    const mode = state.mode;
    const r = await fetch("/" + mode, { method: "POST", headers: { ...headers(), "Prefer": "respond-async" },
                                         body: toJson(body, seed) });
    if (!r.ok) { showError(await errorMessage(r)); return; }
    const job = await r.json();
    state.job = job.job_id;
    state.lastRequest = { mode, body, seed };
    $("cancel").hidden = false;
    setProgress("queued", 0, 0);
    const final = await followEvents(new URL(job.events_url).pathname, (name, data) => {
      if (name === "started") setProgress("starting", 0, 0);
      else if (name === "progress") setProgress(`step ${data.value} of ${data.max}`, data.value, data.max);
      else if (name === "executing" && data.class_type === "VAEDecode") setProgress("decoding", 1, 1);
      else if (name === "done" || name === "error" || name === "cancelled") return { name, data };
      return null;
    });
    if (!final) { showError("the event stream ended early; the job may still be running"); return; }
    if (final.name === "cancelled") { showError("cancelled"); return; }
    if (final.name === "error") { showError((final.data.error && final.data.error.message) || "the job failed"); return; }
    const image = final.data.result.images[0];
    const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
    const picture = await fetch("/view?" + query, { headers: headers() });
    if (!picture.ok) { showError(await errorMessage(picture)); return; }
    const src = URL.createObjectURL(await picture.blob());
    const shownSeed = seed !== null ? seed : String(image.seed);
    const entry = { src, seed: shownSeed, seconds: (performance.now() - started) / 1000, mode, prompt: body.prompt };
    state.lastSeed = shownSeed;
    state.lastRequest.seed = shownSeed;
    show(entry);
    addToHistory(entry);
  } catch (e) {
    showError("request failed: " + e.message);
  } finally {
    state.job = null;
    $("cancel").hidden = true;
    $("progress-box").hidden = true;
    button.disabled = false;
    button.textContent = "Generate";
  }
}

async function cancel() {
  if (!state.job) return;
  setProgress("cancelling", 0, 0);
  const r = await fetch("/jobs/" + state.job, { method: "DELETE", headers: headers() });
  if (!r.ok && r.status !== 409) showError(await errorMessage(r));
}

// "Copy as ...": the last request as a command or a script (a face photo as face.jpg).
function snippet(kind) {
  const request = state.lastRequest;
  if (!request) return "";
  const origin = window.location.origin;
  const body = { ...request.body };
  if (body.reference_image) body.reference_image = "<base64 of face.jpg>";
  const json = toJson(body, request.seed);
  const keyed = Boolean(sessionStorage.getItem("ryla-api-key"));
  const quote = (text) => "'" + String(text).replace(/'/g, "'\\''") + "'";
  if (kind === "curl") {
    return [`curl -X POST ${origin}/${request.mode}`, `-H 'Content-Type: application/json'`,
            ...(keyed ? [`-H "Authorization: Bearer $RYLA_API_KEY"`] : []), `-d ${quote(json)}`,
            `-o ryla.png`].join(" \\\n  ");
  }
  if (kind === "client") {
    const args = [`ryla-client --url ${origin}`, request.mode, `--prompt ${quote(body.prompt)}`];
    if (body.negative_prompt) args.push(`--negative-prompt ${quote(body.negative_prompt)}`);
    args.push(`--width ${body.width}`, `--height ${body.height}`, `--steps ${body.steps}`, `--guidance ${body.guidance}`);
    if (request.seed !== null) args.push(`--seed ${request.seed}`);
    if (request.mode === "flux-lora") args.push(`--lora-id ${quote(body.lora_id)}`, `--lora-strength ${body.lora_strength}`);
    if (request.mode === "flux-instantid") args.push("--reference face.jpg", `--instantid-strength ${body.instantid_strength}`,
                                                     `--controlnet-strength ${body.controlnet_strength}`);
    args.push("--output ryla.png");
    return args.join(" \\\n  ");
  }
  const lines = ["import base64, json", "", "import httpx", ""];
  if (request.mode === "flux-instantid") lines.push('face = base64.b64encode(open("face.jpg", "rb").read()).decode()');
  lines.push(`body = json.loads(${JSON.stringify(json)})`);
  if (request.mode === "flux-instantid") lines.push('body["reference_image"] = face');
  lines.push(`headers = {${keyed ? '"Authorization": "Bearer " + os.environ["RYLA_API_KEY"]' : ""}}`);
  if (keyed) lines.unshift("import os");
  lines.push(`response = httpx.post("${origin}/${request.mode}", json=body, headers=headers, timeout=600)`,
             "response.raise_for_status()", 'open("ryla.png", "wb").write(response.content)',
             'print("seed", response.headers["X-Seed"])');
  return lines.join("\n");
}

async function copySnippet(kind) {
  const text = snippet(kind);
  const box = $("snippet");
  box.value = text;
  box.hidden = false;
  box.select();
  try {
    await navigator.clipboard.writeText(text);
    box.title = "copied";
  } catch (_) {
    box.title = "selected: press Ctrl+C to copy"; // no clipboard outside secure contexts (plain http)
  }
}

async function loadHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const badge = $("model-set");
    badge.textContent = health.model_set === "tiny" ? "tiny test model (noise)" : "FLUX.1-dev";
    badge.classList.toggle("tiny", health.model_set === "tiny");
    if (health.model_set === "tiny") {
      $("tiny-hint").hidden = false;
      if (!state.touched) { // small defaults on the tiny model: seconds, not minutes, on a CPU
        $("size").value = "custom"; $("width").value = 256; $("height").value = 256; $("steps").value = 4;
      }
    }
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
  $("form").addEventListener("input", () => { state.touched = true; });
  $("cancel").addEventListener("click", cancel);
  $("copy-curl").addEventListener("click", () => copySnippet("curl"));
  $("copy-client").addEventListener("click", () => copySnippet("client"));
  $("copy-python").addEventListener("click", () => copySnippet("python"));
  loadHealth();
});
