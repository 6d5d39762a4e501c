// Troupe canvas: a layered box editor living in a gr.HTML component (Gradio 6 `js_on_load`).
// The component's value is the canvas JSON (a string) — the single channel between this editor and Python:
//   {"width": W, "height": H, "regions": [{"id": "r1", "label": "<rex>" | "red ball", "box": [x0, y0, x1, y1],
//                                         "layer": 0 (optional)}],
//    "suggestions": ["<rex>", ...]}
// regions are back-to-front (index 0 is the back); boxes are fractions of the canvas in [0, 1]; see canvas.py.
// Python writes the value (relation picker, add region, open project) and we re-render through `watch`;
// we write it after every finished gesture (`props.value = ...`) and fire `change`.
// Globals provided by Gradio: element, props, trigger, watch.

const MIN = 0.02;  // smallest box side, as a fraction of the canvas
const PALETTE = ["#f97316", "#3b82f6", "#22c55e", "#e11d48", "#a855f7", "#eab308", "#06b6d4", "#ec4899"];
const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];
const stage = element.querySelector(".tc-stage");
const rows = element.querySelector(".tc-rows");
const msg = element.querySelector(".tc-msg");
const sizeTag = element.querySelector(".tc-size");
const datalist = element.querySelector("datalist");
let state = { width: 512, height: 512, regions: [], suggestions: [] };
let selected = null;  // region id
let gesture = null;   // {mode: "draw"|"move"|"resize", ...}
let lastSent = "";

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const round = (v) => Math.round(v * 10000) / 10000;
const colorOf = (id) => PALETTE[(parseInt(String(id).replace(/\D/g, ""), 10) || 0) % PALETTE.length];
const labelOf = (r) => (r.label && r.label.trim()) ? r.label.trim() : "(name me)";

function parse(text) {
  try {
    const data = typeof text === "string" ? JSON.parse(text || "{}") : (text || {});
    if (!data || typeof data !== "object") return null;
    const regions = Array.isArray(data.regions) ? data.regions : [];
    return {
      width: Number(data.width) || 512, height: Number(data.height) || 512,
      suggestions: Array.isArray(data.suggestions) ? data.suggestions.map(String) : [],
      // an optional integer `layer` (0 = back) places a region; otherwise its index does. Sorted back to front
      // (stable, as engines.types.Layout does), the list order alone carries the layers from here on.
      regions: regions.filter((r) => r && Array.isArray(r.box) && r.box.length === 4)
        .map((r, i) => ({ r, i, z: Number.isInteger(r.layer) ? r.layer : i }))
        .sort((a, b) => a.z - b.z || a.i - b.i)
        .map(({ r, i }) => ({ id: String(r.id || `r${i + 1}`), label: String(r.label ?? ""), box: r.box.map(Number) })),
    };
  } catch (e) { return null; }
}

function serialize() {
  return JSON.stringify({
    width: state.width, height: state.height, suggestions: state.suggestions,
    regions: state.regions.map((r) => ({ id: r.id, label: r.label, box: r.box.map(round) })),
  });
}

function commit() {
  const text = serialize();
  if (text === lastSent) return;
  lastSent = text;
  props.value = text;
  trigger("change");
}

function say(text, kind) {
  msg.textContent = text || "";
  msg.className = "tc-msg" + (kind ? " tc-" + kind : "");
}

function nextId() {
  let n = 0;
  for (const r of state.regions) n = Math.max(n, parseInt(r.id.replace(/\D/g, ""), 10) || 0);
  return `r${n + 1}`;
}

function renderStage() {
  const ratio = state.width / state.height;
  stage.style.aspectRatio = `${state.width} / ${state.height}`;
  stage.style.width = `min(100%, ${Math.round(500 * ratio)}px)`;
  sizeTag.textContent = `${state.width} × ${state.height}`;
  stage.querySelectorAll(".tc-box").forEach((el) => el.remove());
  state.regions.forEach((r, i) => {
    const [x0, y0, x1, y1] = r.box;
    const box = document.createElement("div");
    box.className = "tc-box" + (r.id === selected ? " tc-selected" : "");
    box.dataset.id = r.id;
    box.style.cssText = `left:${x0 * 100}%;top:${y0 * 100}%;width:${(x1 - x0) * 100}%;height:${(y1 - y0) * 100}%;` +
      `z-index:${10 + i};--c:${colorOf(r.id)}`;
    const tag = document.createElement("span");
    tag.className = "tc-tag";
    tag.textContent = `${i + 1} · ${labelOf(r)}`;
    box.appendChild(tag);
    for (const h of HANDLES) {
      const handle = document.createElement("span");
      handle.className = `tc-handle tc-${h}`;
      handle.dataset.handle = h;
      box.appendChild(handle);
    }
    stage.appendChild(box);
  });
  stage.classList.toggle("tc-empty", state.regions.length === 0);
}

function renderRows() {
  datalist.innerHTML = "";
  for (const s of state.suggestions) {
    const o = document.createElement("option");
    o.value = s;
    datalist.appendChild(o);
  }
  rows.innerHTML = "";
  if (!state.regions.length) {
    rows.innerHTML = '<div class="tc-none">No regions yet. Drag on the canvas, add one below, or pick a relation.</div>';
  }
  const n = state.regions.length;
  // front first, like an image editor's layer panel
  for (let i = n - 1; i >= 0; i--) {
    const r = state.regions[i];
    const row = document.createElement("div");
    row.className = "tc-row" + (r.id === selected ? " tc-selected" : "");
    row.dataset.id = r.id;
    row.innerHTML =
      `<span class="tc-swatch" style="background:${colorOf(r.id)}">${i + 1}</span>` +
      `<input class="tc-label" list="${datalist.id}" placeholder="words of the prompt or <subject>" spellcheck="false">` +
      `<button class="tc-up" title="Bring forward" ${i === n - 1 ? "disabled" : ""}>▲</button>` +
      `<button class="tc-down" title="Send backward" ${i === 0 ? "disabled" : ""}>▼</button>` +
      `<button class="tc-del" title="Delete region">✕</button>`;
    const input = row.querySelector("input");
    input.value = r.label;
    input.addEventListener("focus", () => select(r.id, false));
    input.addEventListener("input", () => { r.label = input.value; renderStage(); commit(); });
    input.addEventListener("change", () => { r.label = input.value.trim(); commit(); });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") input.blur(); });
    row.querySelector(".tc-up").addEventListener("click", () => move(r.id, +1));
    row.querySelector(".tc-down").addEventListener("click", () => move(r.id, -1));
    row.querySelector(".tc-del").addEventListener("click", () => remove(r.id));
    row.addEventListener("click", (e) => { if (e.target === row || e.target.classList.contains("tc-swatch")) select(r.id); });
    rows.appendChild(row);
  }
}

function render() { renderStage(); renderRows(); }

function select(id, full = true) {
  selected = id;
  if (full) render(); else renderStage();
  element.querySelectorAll(".tc-row").forEach((row) => row.classList.toggle("tc-selected", row.dataset.id === id));
}

function move(id, delta) {
  const i = state.regions.findIndex((r) => r.id === id);
  const j = i + delta;
  if (i < 0 || j < 0 || j >= state.regions.length) return;
  const [r] = state.regions.splice(i, 1);
  state.regions.splice(j, 0, r);
  selected = id;
  render();
  commit();
}

function remove(id) {
  state.regions = state.regions.filter((r) => r.id !== id);
  if (selected === id) selected = null;
  render();
  commit();
  say("");
}

function point(e) {
  const rect = stage.getBoundingClientRect();
  return [clamp((e.clientX - rect.left) / rect.width, 0, 1), clamp((e.clientY - rect.top) / rect.height, 0, 1)];
}

stage.addEventListener("pointerdown", (e) => {
  if (e.button !== 0) return;
  e.preventDefault();
  stage.focus({ preventScroll: true });
  const [px, py] = point(e);
  const handle = e.target.closest(".tc-handle");
  const boxEl = e.target.closest(".tc-box");
  if (boxEl && !e.shiftKey) {  // Shift-drag always draws, even over another box
    const r = state.regions.find((x) => x.id === boxEl.dataset.id);
    select(r.id);
    gesture = { mode: handle ? "resize" : "move", handle: handle && handle.dataset.handle, r, start: [px, py], orig: r.box.slice() };
  } else {
    const r = { id: nextId(), label: "", box: [px, py, px, py] };
    gesture = { mode: "draw", r, start: [px, py] };
    state.regions.push(r);
    selected = r.id;
  }
  stage.setPointerCapture(e.pointerId);
});

stage.addEventListener("pointermove", (e) => {
  if (!gesture) return;
  const [px, py] = point(e);
  const g = gesture;
  const [sx, sy] = g.start;
  if (g.mode === "draw") {
    g.r.box = [Math.min(sx, px), Math.min(sy, py), Math.max(sx, px), Math.max(sy, py)];
  } else if (g.mode === "move") {
    const [x0, y0, x1, y1] = g.orig;
    const dx = clamp(px - sx, -x0, 1 - x1), dy = clamp(py - sy, -y0, 1 - y1);
    g.r.box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  } else {
    let [x0, y0, x1, y1] = g.orig;
    const h = g.handle;
    if (h.includes("w")) x0 = clamp(x0 + px - sx, 0, x1 - MIN);
    if (h.includes("e")) x1 = clamp(x1 + px - sx, x0 + MIN, 1);
    if (h.includes("n")) y0 = clamp(y0 + py - sy, 0, y1 - MIN);
    if (h.includes("s")) y1 = clamp(y1 + py - sy, y0 + MIN, 1);
    g.r.box = [x0, y0, x1, y1];
  }
  renderStage();
});

function endGesture(e) {
  if (!gesture) return;
  const g = gesture;
  gesture = null;
  if (stage.hasPointerCapture && e && e.pointerId !== undefined && stage.hasPointerCapture(e.pointerId)) {
    stage.releasePointerCapture(e.pointerId);
  }
  if (g.mode === "draw") {
    const [x0, y0, x1, y1] = g.r.box;
    if (x1 - x0 < MIN || y1 - y0 < MIN) {
      state.regions = state.regions.filter((r) => r !== g.r);
      selected = null;
      render();
      if (x1 - x0 > 0.002 || y1 - y0 > 0.002) say("That box is too small: drag further to draw a region.", "warn");
      return;
    }
    say("New region: name it in the layer list (words of the prompt, or <subject>).", "info");
    render();
    commit();
    const input = element.querySelector(`.tc-row[data-id="${g.r.id}"] input`);
    if (input) input.focus();
    return;
  }
  render();
  commit();
}
stage.addEventListener("pointerup", endGesture);
stage.addEventListener("pointercancel", endGesture);

stage.addEventListener("dblclick", (e) => {  // double-click a box: rename it
  const boxEl = e.target.closest(".tc-box");
  const input = boxEl && element.querySelector(`.tc-row[data-id="${boxEl.dataset.id}"] input`);
  if (input) { input.focus(); input.select(); }
});

stage.addEventListener("keydown", (e) => {
  if (!selected) return;
  const r = state.regions.find((x) => x.id === selected);
  if (!r) return;
  if (e.key === "Delete" || e.key === "Backspace") { e.preventDefault(); remove(r.id); return; }
  const step = e.shiftKey ? 0.05 : 0.01;
  const d = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[e.key];
  if (!d) return;
  e.preventDefault();
  const [x0, y0, x1, y1] = r.box;
  const dx = clamp(d[0], -x0, 1 - x1), dy = clamp(d[1], -y0, 1 - y1);
  r.box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  renderStage();
  commit();
});

function load() {
  const incoming = typeof props.value === "string" ? props.value : JSON.stringify(props.value || {});
  if (incoming === lastSent) return;
  const parsed = parse(incoming);
  if (!parsed) return;
  state = parsed;
  lastSent = incoming;
  if (!state.regions.some((r) => r.id === selected)) selected = null;
  say("");
  render();
}

// The latest result, faintly under the boxes, so a person can see where things landed and adjust.
const ghost = element.querySelector(".tc-ghost");
const ghostToggle = element.querySelector(".tc-ghost-toggle");
function updateGhost() {
  const img = document.querySelector("#result-gallery img");
  const src = img && img.getAttribute("src");
  if (src && ghost.getAttribute("src") !== src) ghost.setAttribute("src", src);
  ghost.style.display = src && ghostToggle.checked ? "block" : "none";
  ghostToggle.parentElement.style.visibility = src ? "visible" : "hidden";
}
ghostToggle.addEventListener("change", updateGhost);
let ghostQueued = false;
new MutationObserver(() => {
  if (ghostQueued) return;
  ghostQueued = true;
  requestAnimationFrame(() => { ghostQueued = false; updateGhost(); });
}).observe(document.querySelector("#result-gallery") || document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["src"] });
updateGhost();

datalist.id = "tc-suggest-" + Math.random().toString(36).slice(2, 8);
watch("value", load);
load();
