// llm-installer studio: plain JS over /api/ (no build step, no CDN). Every error shows as one line in #error.
"use strict";
const $ = (sel) => document.querySelector(sel);
const S = { key: localStorage.getItem("studio-key") || "", job: null, points: [], since: 0, planTimer: null };
window.studio = S;

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) (k === "class" ? (e.className = v) : e.setAttribute(k, v));
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function showError(msg) { const b = $("#error"); b.textContent = msg ? "error: " + msg : ""; b.hidden = !msg; }
function headers(extra = {}) { return S.key ? { ...extra, Authorization: "Bearer " + S.key } : extra; }

async function api(method, path, body, raw) {
  const opts = { method, headers: headers(raw ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) opts.body = raw ? body : JSON.stringify(body);
  const r = await fetch(path, opts);
  if (r.status === 401) $("#key-box").hidden = false;
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) { showError(data.error || `HTTP ${r.status}`); throw new Error(data.error); }
  return data;
}
const quiet = (p) => p.catch(() => null);   // the error is already on the page
function table(cols, rows) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", {}, c)))));
  const tb = el("tbody"); rows.forEach((r) => tb.append(el("tr", {}, ...r.map((c) => el("td", {}, c ?? "-"))))); t.append(tb);
  return t;
}
const model = () => $("#model").value;

// ----- Models ---------------------------------------------------------------------------------------
async function loadModels() {
  const data = await api("GET", "/api/models");
  const tb = $("#models-table tbody"); tb.replaceChildren();
  const keep = model(); $("#model").replaceChildren();
  for (const m of data.models) {
    const verify = el("button", { "data-name": m.name, class: "verify" }, "verify");
    const remove = el("button", { "data-name": m.name, class: "remove" }, "remove");
    verify.onclick = () => quiet(verifyModel(m.name)); remove.onclick = () => quiet(removeModel(m.name));
    tb.append(el("tr", { "data-name": m.name }, ...[m.name, m.family, m.handler, m.parameters, m.size,
      m.adapter ? "yes" : "-", m.status].map((c) => el("td", {}, c)), el("td", {}, verify, remove)));
    $("#model").append(el("option", { value: m.name }, m.name));
  }
  if (keep && data.models.some((m) => m.name === keep)) $("#model").value = keep;
  document.body.dataset.models = String(data.models.length);
}
async function install() {
  showError("");
  const job = await api("POST", "/api/models/install", { ref: $("#install-ref").value });
  const bar = $("#install-progress"); bar.hidden = false; bar.removeAttribute("value");
  for (;;) {
    const j = await api("GET", `/api/jobs/${job.id}`);
    if (j.progress != null) bar.value = j.progress;
    $("#install-status").textContent = `${j.state} ${j.message || ""}`;
    if (j.state === "failed") { showError(j.error); break; }
    if (j.state === "done") { bar.value = 1; break; }
    await new Promise((r) => setTimeout(r, 700));
  }
  await loadModels(); planSoon();
}
async function check() {
  const d = await api("POST", "/api/models/check", { ref: $("#install-ref").value });
  $("#check-out").replaceChildren(el("h3", {}, `${d.model_id}: ${d.parameters} parameters, ${d.size} (${d.machine})`),
    table(["use", "needs", "fits GPU", "fits RAM"], d.rows.map((r) => [r.use, r.needs,
      r.fits_gpu == null ? "-" : r.fits_gpu ? "yes" : "no", r.fits_ram ? "yes" : "no"])), el("p", {}, "verdict: " + d.verdict));
}
async function verifyModel(name) {
  const d = await api("POST", `/api/models/${encodeURIComponent(name)}/verify`);
  $("#verify-out").replaceChildren(el("p", { class: d.ok ? "ok" : "bad" }, `${name}: ${d.message}`));
}
async function removeModel(name) {
  if (!confirm(`Delete ${name} with its adapter and runs?`)) return;
  await api("DELETE", `/api/models/${encodeURIComponent(name)}`, { confirm: name });
  await loadModels();
}

// ----- Data -----------------------------------------------------------------------------------------
async function loadData(select) {
  const d = await api("GET", "/api/data");
  const keep = select || $("#data-file").value; $("#data-file").replaceChildren();
  d.files.forEach((f) => $("#data-file").append(el("option", { value: f }, f)));
  if (keep && d.files.includes(keep)) $("#data-file").value = keep;
  else if (d.files.includes("examples/fictional_facts.jsonl")) $("#data-file").value = "examples/fictional_facts.jsonl";
}
async function upload() {
  const f = $("#upload-file").files[0];
  if (!f) return showError("choose a file to upload first");
  const d = await api("PUT", `/api/uploads/${encodeURIComponent(f.name)}`, f, true);
  await loadData(d.path); showError("");
}
function histogram(rows) {
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  const w = 420, h = 120, top = Math.max(1, ...rows.map((r) => r.count)), bw = w / Math.max(1, rows.length);
  svg.setAttribute("width", w); svg.setAttribute("height", h + 30); svg.setAttribute("id", "histogram");
  rows.forEach((r, i) => {
    const bh = (h * r.count) / top, rect = document.createElementNS(ns, "rect");
    Object.entries({ x: i * bw + 2, y: h - bh, width: bw - 4, height: bh, fill: "#4a7bd0" }).forEach(([k, v]) => rect.setAttribute(k, v));
    const t = document.createElementNS(ns, "text");
    Object.entries({ x: i * bw + 2, y: h + 14, "font-size": 10 }).forEach(([k, v]) => t.setAttribute(k, v));
    t.textContent = `${r.range} (${r.count})`; svg.append(rect, t);
  });
  return svg;
}
async function inspect() {
  showError("");
  const d = await api("POST", "/api/data/inspect", { data: [$("#data-file").value], model: model() || null });
  const out = [table(["file", "type", "format", "records", "rejects"], d.files.map((f) => [f.file, f.type, f.format, f.records, f.rejects])),
    el("p", {}, `records: ${d.records} usable, ${d.rejected_total} rejected, ${d.duplicates} exact duplicates`)];
  if (d.rejected.length) out.push(el("ul", { id: "rejects" }, ...d.rejected.map((r) => el("li", {}, `${r.origin}: ${r.reason}`))));
  if (d.lengths) out.push(el("p", {}, `tokens per record (${d.tokenizer}): min ${d.lengths.min}, median ${d.lengths.median}, max ${d.lengths.max}, total ${d.lengths.total}, trained ${d.lengths.trained}`), histogram(d.histogram));
  if (d.example.length) {
    const ex = el("div", { class: "example", id: "example" });
    d.example.forEach((t) => ex.append(el("span", { class: t.trained ? "trained" : "masked" }, t.text)));
    out.push(el("h3", {}, `example ${d.example_origin}: green = trained (loss), grey = masked`), ex);
  }
  $("#inspect-out").replaceChildren(...out);
}

// ----- Plan -----------------------------------------------------------------------------------------
function form() {
  const f = Object.fromEntries(new FormData($("#plan-form")).entries());
  return { ...f, model: model(), data: $("#data-file").value || null };
}
function planSoon() { clearTimeout(S.planTimer); S.planTimer = setTimeout(() => quiet(plan()), 400); }
async function plan() {
  if (!model()) return;
  const d = await api("POST", "/api/plan", form());
  showError("");
  $("#plan-out").replaceChildren(el("p", {}, el("code", {}, d.command)),
    table(["setting", "value", "source", "why"], d.settings.map((s) => [s.key, String(s.value), s.source, s.why])),
    el("h3", {}, `trainable parameters: ${d.trainable.toLocaleString()}`),
    table(["group", "trainable", "total"], d.parameters.map((p) => [p.group, p.trainable.toLocaleString(), p.total.toLocaleString()])),
    el("h3", {}, `memory estimate: ${d.memory.total_gb.toFixed(2)} GiB (${d.verdict})`),
    table(["part", "GiB"], Object.entries(d.memory).map(([k, v]) => [k.replace(/_gb$/, ""), v.toFixed(2)])));
  document.body.dataset.plan = "shown";
}

// ----- Train ----------------------------------------------------------------------------------------
async function startTraining(resume) {
  showError("");
  const job = await api("POST", "/api/train", { ...form(), resume: !!resume });
  follow(job);
}
function follow(job) { S.job = job.id; S.points = []; S.since = 0; $("#report-box").hidden = true; $("#stop-reason").textContent = ""; draw(); }
function draw() {
  const c = $("#chart"), g = c.getContext("2d"), pts = S.points;
  g.clearRect(0, 0, c.width, c.height);
  const train = pts.filter((p) => p.loss != null), val = pts.filter((p) => p.eval_loss != null);
  const all = [...train.map((p) => p.loss), ...val.map((p) => p.eval_loss)];
  g.fillStyle = "#345"; g.font = "12px sans-serif";
  if (!all.length) { g.fillText("loss appears here while training", 20, 20); return; }
  const maxStep = Math.max(1, ...pts.map((p) => p.max_steps || p.step));
  const pad = (Math.max(...all) - Math.min(...all)) * 0.08 || 0.05, hi = Math.max(...all) + pad, lo = Math.max(0, Math.min(...all) - pad);
  const X = (s) => 40 + ((c.width - 60) * s) / maxStep, Y = (v) => c.height - 25 - ((c.height - 45) * (v - lo)) / (hi - lo || 1);
  g.fillText(hi.toFixed(3), 2, Y(hi) + 10); g.fillText(lo.toFixed(3), 2, Y(lo)); g.fillText(`step ${maxStep}`, c.width - 70, c.height - 8);
  for (const [series, key, color] of [[train, "loss", "#2f6fd0"], [val, "eval_loss", "#d0602f"]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    series.forEach((p, i) => (i ? g.lineTo(X(p.step), Y(p[key])) : g.moveTo(X(p.step), Y(p[key]))));
    g.stroke(); g.fillStyle = color; series.forEach((p) => g.fillRect(X(p.step) - 3, Y(p[key]) - 3, 6, 6));
  }
  g.fillStyle = "#2f6fd0"; g.fillText("train", c.width - 120, 14); g.fillStyle = "#d0602f"; g.fillText("validation", c.width - 80, 14);
}
async function showReport(id) {
  const r = await api("GET", `/api/jobs/${id}/report`);
  $("#report").textContent = r.markdown;
  const img = await fetch(`/api/jobs/${id}/loss.png`, { headers: headers() });
  if (img.ok) $("#loss-img").src = URL.createObjectURL(await img.blob());
  $("#report-box").hidden = false; document.body.dataset.report = String(id);
}
async function poll() {
  const { jobs } = await api("GET", "/api/jobs");
  $("#jobs").replaceChildren(...jobs.slice().reverse().map((j) => el("li", {}, `#${j.id} ${j.kind} ${j.model} — ${j.state}${j.message ? ": " + j.message : ""}${j.error ? " — " + j.error : ""}`)));
  const mine = jobs.filter((j) => j.kind === "train" && j.model === model());
  if (S.job == null || !mine.some((j) => j.id === S.job)) { if (!mine.length) return; follow(mine[mine.length - 1]); }
  const d = await api("GET", `/api/jobs/${S.job}?since=${S.since}`);
  const rows = d.metrics.filter((r) => !r.event);
  S.points.push(...rows); S.since += d.metrics.length; if (rows.length) draw();
  const last = S.points.filter((p) => p.loss != null).pop();
  $("#train-status").textContent = `job ${d.id}: ${d.state}`;
  document.body.dataset.train = d.state; document.body.dataset.points = String(S.points.length);
  if (last) $("#train-stats").textContent = `step ${last.step}/${last.max_steps} · loss ${last.loss == null ? "-" : last.loss.toFixed(4)} · ${last.tokens_per_s} tokens/s · ETA ${last.eta_s == null ? "-" : Math.round(last.eta_s) + " s"}`;
  const end = d.metrics.find((r) => r.event === "end");
  if (end || d.message) $("#stop-reason").textContent = "stop reason: " + (d.message || end.stop_reason);
  if (d.state === "failed" && d.error) showError(d.error);
  if (d.has_report && ["done", "stopped"].includes(d.state) && document.body.dataset.report !== String(d.id)) { await showReport(d.id); await loadModels(); }
}
async function stopTraining() { if (S.job != null) await api("POST", `/api/jobs/${S.job}/stop`); }

// ----- Compare --------------------------------------------------------------------------------------
async function ask(adapter, out) {
  out.textContent = ""; out.dataset.done = "no";
  const r = await fetch("/api/chat", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model: model(), prompt: $("#cmp-prompt").value, adapter, max_tokens: 48 }) });
  if (!r.ok) { const e = await r.json().catch(() => ({})); out.dataset.done = "error"; return showError(e.error || `HTTP ${r.status}`); }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
  for (;;) {
    const { value, done } = await reader.read(); if (done) break;
    buf += dec.decode(value, { stream: true }); const lines = buf.split("\n"); buf = lines.pop();
    for (const line of lines) { if (!line) continue; const ev = JSON.parse(line);
      if (ev.text) out.textContent += ev.text; if (ev.error) showError(ev.error); }
  }
  out.dataset.done = "yes";
}
function compare() { showError(""); ask(false, $("#cmp-base")); ask(true, $("#cmp-lora")); }

// ----- Export ---------------------------------------------------------------------------------------
async function exportModel() {
  $("#export-out").textContent = "exporting ...";
  const d = await quiet(api("POST", "/api/export", { model: model(), kind: $("#export-kind").value }));
  $("#export-out").textContent = d ? d.message + (d.note ? "\nnote: " + d.note : "") : "";
}

async function init() {
  const d = await api("GET", "/api/info");
  $("#where").textContent = `models folder ${d.models_dir}`;
  d.exports.forEach((x) => $("#export-kind").append(el("option", { value: x.id }, x.label)));
  await loadModels(); await loadData(); planSoon(); draw();
  document.body.dataset.ready = "yes";
}
function wire() {
  const on = (id, fn) => ($(id).onclick = (e) => { e.preventDefault(); quiet(fn()); });
  on("#install-btn", install); on("#check-btn", check); on("#upload-btn", upload); on("#inspect-btn", inspect);
  on("#train-btn", () => startTraining(false)); on("#resume-btn", () => startTraining(true)); on("#stop-btn", stopTraining);
  on("#cmp-btn", async () => compare()); on("#export-btn", exportModel);
  on("#key-btn", async () => { S.key = $("#api-key").value; localStorage.setItem("studio-key", S.key); $("#key-box").hidden = true; showError(""); await init(); });
  $("#plan-form").addEventListener("input", planSoon); $("#model").onchange = () => { S.job = null; planSoon(); };
  $("#data-file").onchange = planSoon;
  setInterval(() => quiet(poll()), 1000);
  quiet(init());
}
document.addEventListener("DOMContentLoaded", wire);
