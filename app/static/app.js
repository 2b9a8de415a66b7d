// The char-rnn page: stream generated text (POST /generate read as server-sent events) with each character's
// probability, and look inside the network (POST /inspect). Plain browser JavaScript, no build step, nothing
// loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,        // GET /models/{name} of the chosen model
  vocab: new Set(),
  sessionId: null,    // the session of the last generation, for Continue
  controller: null,   // AbortController of the running generation
  generated: [],      // the token events of the output's generated characters: {char, logprob, top_logprobs}
  hovered: null,      // the output's character whose probabilities are shown
  inspect: null,      // the last inspection: its request, answer, and the units' values fetched so far
};

// ---- errors ----

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The service answers every failure as {"error": {"type", "message"}}; anything else is shown as it came.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error) return `${body.error.message} (${response.status} ${body.error.type})`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}: ${text.slice(0, 300)}`;
}

// ---- API key: a server with CHARRNN_API_KEYS set answers 401 without one; the page then asks for it ----

const KEY_STORAGE = "charrnn-api-key";  // kept in this browser's localStorage, sent only to this server

function withKey(options = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
}

async function api(url, options) {
  const response = await fetch(url, withKey(options));
  if (response.status === 401) $("key-form").hidden = false;
  return response;
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  $("key-form").hidden = true;
  clearError();
  start();
}

async function getJSON(url, options) {
  const response = await api(url, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// ---- models ----

async function loadModels() {
  const list = await getJSON("/models");
  const select = $("model");
  select.replaceChildren(...list.models.map((m) => new Option(m.name, m.name, false, m.name === list.default)));
  if (!list.models.length) showError("The server has no models loaded.");
  else await chooseModel(select.value);
}

async function chooseModel(name) {
  const model = await getJSON(`/models/${encodeURIComponent(name)}`);
  state.model = model;
  state.vocab = new Set(model.vocabulary);
  state.sessionId = null;
  $("continue").disabled = true;
  $("session").textContent = "–";
  const loss = model.val_bpc == null ? "" : `, ${model.val_bpc.toFixed(3)} bits/char`;
  $("model-facts").textContent = `${model.layers}×${model.hidden} ${model.cell.toUpperCase()}, ` +
    `${model.vocab_size} characters${loss}`;
  $("layer").replaceChildren(...Array.from({ length: model.layers }, (_, i) =>
    new Option(String(i), String(i), false, i === model.layers - 1)));
  $("kind").querySelector("option[value=cell]").disabled = model.cell !== "lstm";
  if (model.cell !== "lstm") $("kind").value = "hidden";
  checkPrime();
}

// Characters the model has never seen cannot be read; flag them before anything is sent.
function unknownChars(text) {
  return [...new Set([...text].filter((c) => !state.vocab.has(c)))];
}

function describeChars(chars) {
  return chars.slice(0, 20).map((c) =>
    `'${c}' (U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")})`).join(", ");
}

function checkPrime() {
  const unknown = unknownChars($("prime").value);
  $("prime-check").hidden = unknown.length === 0;
  $("prime-check").textContent = unknown.length
    ? `Not in the vocabulary of ${state.model.name}: ${describeChars(unknown)}` : "";
  return unknown;
}

// ---- server-sent events over fetch (EventSource cannot POST) ----

async function* readEvents(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = blocks.pop();
      for (const block of blocks) {
        let event = "message";
        const data = [];
        for (const line of block.split(/\r\n|\n|\r/)) {
          if (line.startsWith(":")) continue;  // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
      if (signal.aborted) break;
    }
  } finally {
    reader.releaseLock();
  }
}

// ---- generate ----

function setRunning(running) {
  $("generate").disabled = running;
  $("continue").disabled = running || !state.sessionId;
  $("stop").disabled = !running;
  $("model").disabled = running;
}

function positiveInt(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

async function generate(continuing) {
  clearError();
  const prime = continuing ? "" : $("prime").value;
  const unknown = unknownChars(prime);
  if (unknown.length) {
    showError(`The prime has characters that model ${state.model.name} does not know: ${describeChars(unknown)}. ` +
      "Remove them or choose another model.");
    return;
  }
  const body = {
    model: state.model.name,
    prime,
    temperature: Number($("temperature").value),
    max_chars: positiveInt("length") ?? 500,
    stream: true,
  };
  const seed = positiveInt("seed");
  const topK = positiveInt("top-k");
  if (seed !== null) body.seed = seed;
  if (topK !== null) body.top_k = topK;
  if (continuing) body.session_id = state.sessionId;
  if ($("logprobs").checked) body.logprobs = TOP_LOGPROBS;

  if (!continuing) {
    const shown = document.createElement("span");
    shown.className = "prime";
    shown.textContent = prime;
    $("output").replaceChildren(shown);
    state.generated = [];
    state.hovered = null;
    $("char-info").textContent = CHAR_INFO_HINT;
  }

  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  $("status").textContent = "starting";
  $("ttfc").textContent = "–";
  $("rate").textContent = "–";
  $("count").textContent = "0";
  const sent = performance.now();
  let first = null;
  let count = 0;
  const showFigures = () => {
    $("count").textContent = String(count);
    if (first !== null && count > 1) {
      $("rate").textContent = `${((count - 1) / ((performance.now() - first) / 1000)).toFixed(0)} chars/s`;
    }
  };
  const figures = setInterval(showFigures, 200);
  try {
    const response = await api("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    $("status").textContent = "streaming";
    for await (const { event, data } of readEvents(response, controller.signal)) {
      if (event === "token") {
        if (first === null) {
          first = performance.now();
          $("ttfc").textContent = `${(first - sent).toFixed(0)} ms`;
        }
        appendGenerated(data);
        count += 1;
      } else if (event === "start") {
        state.sessionId = data.session_id;
        $("session").textContent = data.session_id;
      } else if (event === "done") {
        $("status").textContent = `done (${data.finish_reason}, ${data.generated_chars} characters)`;
      } else if (event === "error") {
        throw new Error(`${data.error.message} (${data.error.type})`);
      }
    }
  } catch (e) {
    if (controller.signal.aborted) $("status").textContent = "stopped";
    else {
      $("status").textContent = "failed";
      showError(e.message || String(e));
    }
  } finally {
    clearInterval(figures);
    showFigures();  // a short stream may end before the first tick
    state.controller = null;
    setRunning(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // the server sees the disconnect and frees the stream
}

// ---- the probabilities of generated characters ----

const TOP_LOGPROBS = 5;     // alternatives per character: the most the API gives
const SURPRISE_MAX = 4;     // nats: -log p at which the surprise shade is full (p <= 1.8%)
const CHAR_INFO_HINT = $("char-info").textContent;  // the panel's text before the first hover

// One span per generated character (5,000 stream in without slowing the page): its index into state.generated.
function appendGenerated(token) {
  const span = document.createElement("span");
  span.dataset.i = String(state.generated.length);
  span.textContent = token.char;
  if (token.logprob !== undefined && $("surprise").checked) span.style.backgroundColor = surpriseColour(-token.logprob);
  state.generated.push(token);
  $("output").append(span);
}

// 0 nats (certain) white, SURPRISE_MAX nats or more full orange.
function surpriseColour(nats) {
  return `rgba(240, 120, 0, ${Math.min(1, nats / SURPRISE_MAX).toFixed(3)})`;
}

function colourBySurprise() {
  const on = $("surprise").checked;
  $("surprise-legend").hidden = !on;
  for (const span of $("output").querySelectorAll("span[data-i]")) {
    const token = state.generated[Number(span.dataset.i)];
    span.style.backgroundColor = on && token.logprob !== undefined ? surpriseColour(-token.logprob) : "";
  }
}

function percent(p) {
  return p < 0.001 ? "<0.1%" : `${(p * 100).toFixed(1)}%`;
}

function showCharInfo(event) {
  const span = event.target.closest("span[data-i]");
  if (!span || span === state.hovered) return;
  if (state.hovered) state.hovered.classList.remove("hover");
  span.classList.add("hover");
  state.hovered = span;
  const token = state.generated[Number(span.dataset.i)];
  const panel = $("char-info");
  if (token.logprob === undefined) {
    panel.textContent = `${JSON.stringify(token.char)}: generated without log-probabilities.`;
    return;
  }
  const mine = document.createElement("b");
  mine.dataset.logprob = String(token.logprob);
  mine.textContent = `${JSON.stringify(token.char)} ${percent(Math.exp(token.logprob))}`;
  panel.replaceChildren(mine, ` (surprise ${(-token.logprob).toFixed(2)} nats); the model expected: `);
  for (const top of token.top_logprobs) {
    const item = predictionItem(top.char, Math.exp(top.logprob), percent(Math.exp(top.logprob)));
    item.dataset.logprob = String(top.logprob);
    item.classList.toggle("chosen", top.char === token.char);
    panel.append(item);
  }
}

// A character, its probability and a bar as long as the probability: the Generate and Inspect panels' items.
function predictionItem(char, p, shown) {
  const item = document.createElement("span");
  item.className = "prediction";
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${Math.round(p * 60)}px`;
  item.append(` ${JSON.stringify(char)} ${shown} `, bar);
  return item;
}

// ---- inspect ----

function heat(value) {
  const a = Math.min(1, Math.abs(value)).toFixed(3);
  return value >= 0 ? `rgba(220, 40, 40, ${a})` : `rgba(40, 90, 220, ${a})`;
}

async function inspect() {
  clearError();
  const text = $("inspect-text").value;
  const unknown = unknownChars(text);
  if (unknown.length) {
    showError(`The text has characters that model ${state.model.name} does not know: ${describeChars(unknown)}.`);
    return;
  }
  $("inspect").disabled = true;
  const request = { model: state.model.name, text, layer: Number($("layer").value), kind: $("kind").value };
  try {
    const result = await postInspect(request);
    state.inspect = { request, result, rows: unitRows(result), loading: new Map() };
  } catch (e) {
    showError(e.message);
    return;
  } finally {
    $("inspect").disabled = false;
  }
  renderInspect();
}

function postInspect(body) {
  return getJSON("/inspect", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// An answer has the values of a few units (`units_shown`); keep them by unit number.
function unitRows(result) {
  return new Map(result.units_shown.map((unit, k) => [unit, result.activations[k]]));
}

// The first answer holds the suggested units; any other unit is fetched with the block of units around it
// (same text, layer and kind, no predictions), once.
const UNIT_BLOCK = 64;

function loadUnits(inspection, unit) {
  const size = Math.min(UNIT_BLOCK, inspection.result.max_units);
  const first = Math.floor(unit / size) * size;
  if (!inspection.loading.has(first)) {
    const units = [];
    for (let u = first; u < Math.min(first + size, inspection.result.units); u++) {
      if (!inspection.rows.has(u)) units.push(u);
    }
    const request = postInspect({ ...inspection.request, units, predictions: false }).then((result) => {
      for (const [u, row] of unitRows(result)) inspection.rows.set(u, row);
    });
    request.catch(() => inspection.loading.delete(first));  // a failed block may be asked for again
    inspection.loading.set(first, request);
  }
  return inspection.loading.get(first);
}

function renderInspect() {
  const result = state.inspect.result;
  const heatmap = $("heatmap");
  heatmap.replaceChildren();
  result.chars.forEach((c, i) => {
    const span = document.createElement("span");
    span.dataset.index = String(i);
    if (c === "\n") {
      span.textContent = "↵\n";
      span.className = "nl";
    } else span.textContent = c;
    heatmap.append(span);
  });
  $("unit").max = String(result.units - 1);
  $("suggestions").replaceChildren(...result.suggestions.map((s) => {
    const button = document.createElement("button");
    button.type = "button";
    const score = s.reason === "high variance" ? `variance ${s.score}` : `r = ${s.score}`;
    button.textContent = `unit ${s.unit}: ${s.reason} (${score})`;
    button.addEventListener("click", () => showUnit(s.unit));
    return button;
  }));
  $("inspect-result").hidden = false;
  $("inspect-result").dataset.shown = `${result.layer}:${result.kind}`;  // which layer the heat map is of
  delete $("inspect-result").dataset.unit;
  showUnit(result.suggestions.length ? result.suggestions[0].unit : 0);
}

async function showUnit(unit) {
  const inspection = state.inspect;
  if (!inspection) return;
  unit = Math.max(0, Math.min(inspection.result.units - 1, unit));
  $("unit").value = String(unit);
  if (!inspection.rows.has(unit)) {
    $("unit-status").textContent = `loading unit ${unit}…`;
    try {
      await loadUnits(inspection, unit);
    } catch (e) {
      if (state.inspect === inspection && Number($("unit").value) === unit) {
        $("unit-status").textContent = "";
        showError(e.message);
      }
      return;
    }
  }
  if (state.inspect !== inspection || Number($("unit").value) !== unit) return;  // the user has moved on
  $("unit-status").textContent = "";
  const row = inspection.rows.get(unit);
  const spans = $("heatmap").children;
  for (let i = 0; i < spans.length; i++) spans[i].style.backgroundColor = heat(row[i]);
  $("inspect-result").dataset.unit = String(unit);  // the unit the heat map shows
}

function showPredictions(event) {
  const span = event.target.closest("span[data-index]");
  if (!span || !state.inspect) return;
  const { result, rows } = state.inspect;
  for (const old of $("heatmap").querySelectorAll(".hover")) old.classList.remove("hover");
  span.classList.add("hover");
  const i = Number(span.dataset.index);
  const unit = Number($("unit").value);
  const shown = (c) => JSON.stringify(c);
  const panel = $("predictions");
  const value = rows.has(unit) ? rows.get(unit)[i].toFixed(3) : "…";
  panel.replaceChildren(`after ${shown(result.chars[i])} (unit ${unit}: ${value}) the model expects: `);
  for (const p of result.predictions[i]) panel.append(predictionItem(p.char, p.p, p.p.toFixed(3)));
}

// ---- wiring ----

function showView(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  $("view-generate").hidden = view !== "generate";
  $("view-inspect").hidden = view !== "inspect";
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("model").addEventListener("change", (e) => chooseModel(e.target.value).catch((err) => showError(err.message)));
  $("prime").addEventListener("input", checkPrime);
  $("temperature").addEventListener("input", (e) => {
    $("temperature-value").textContent = Number(e.target.value) === 0 ? "0 (argmax)" : e.target.value;
  });
  $("generate").addEventListener("click", () => generate(false));
  $("continue").addEventListener("click", () => generate(true));
  $("stop").addEventListener("click", stop);
  $("output").addEventListener("mouseover", showCharInfo);
  $("surprise").addEventListener("change", colourBySurprise);
  $("inspect").addEventListener("click", inspect);
  $("unit").addEventListener("change", (e) => showUnit(Number(e.target.value)));
  $("unit-prev").addEventListener("click", () => showUnit(Number($("unit").value) - 1));
  $("unit-next").addEventListener("click", () => showUnit(Number($("unit").value) + 1));
  $("heatmap").addEventListener("mouseover", showPredictions);
  $("key-form").addEventListener("submit", useKey);
}

function start() {
  loadModels().then(() => document.body.dataset.ready = "true").catch((e) => showError(`Could not load models: ${e.message}`));
}

wire();
start();
