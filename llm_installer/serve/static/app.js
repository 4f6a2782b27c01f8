// The web chat page: streams answers from /v1/chat/completions (server-sent events), switches between
// the base model and the adapter, shows model info, and renders markdown *safely*: every piece of model
// output is HTML-escaped before the few markdown constructs are turned into a fixed set of tags, so the
// model cannot inject markup or script (the server's Content-Security-Policy is a second fence).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, authRequired: false };

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(escaped) {
  // Input is already escaped; only these patterns become tags.
  return escaped
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
             '<a href="$2" rel="noopener noreferrer nofollow" target="_blank">$1</a>');
}

function renderText(text) {
  const out = [];
  for (const block of text.split(/\n{2,}/)) {
    const lines = block.split("\n");
    if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l))) {
      const ordered = /^\s*\d+\./.test(lines[0]);
      const items = lines.map((l) => "<li>" + inline(escapeHtml(l.replace(/^\s*([-*]|\d+\.)\s+/, ""))) + "</li>");
      out.push((ordered ? "<ol>" : "<ul>") + items.join("") + (ordered ? "</ol>" : "</ul>"));
      continue;
    }
    const heading = /^(#{1,4})\s+(.*)$/.exec(block);
    if (heading && lines.length === 1) {
      const level = heading[1].length + 2;
      out.push(`<h${level}>` + inline(escapeHtml(heading[2])) + `</h${level}>`);
      continue;
    }
    out.push("<p>" + lines.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>");
  }
  return out.join("");
}

function renderMarkdown(src) {
  const parts = [];
  const fence = /```([\w+-]*)[^\n]*\n?([\s\S]*?)(?:```|$)/g;
  let last = 0;
  let m;
  while ((m = fence.exec(src)) !== null) {
    if (m.index > last) parts.push(renderText(src.slice(last, m.index)));
    parts.push("<pre><code>" + escapeHtml(m[2]) + "</code></pre>");
    last = fence.lastIndex;
    if (m[0].length === 0) break;
  }
  if (last < src.length) parts.push(renderText(src.slice(last)));
  return parts.join("");
}
window.renderMarkdown = renderMarkdown;  // used by the page test
window.chatState = state;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : $("model").value || "assistant";
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text; else body.innerHTML = renderMarkdown(text);
  div.append(who, body);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.state = busy ? "streaming" : "idle";
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  div.dataset.chunks = "0";
  const body = div.querySelector(".body");
  let answer = "";
  state.controller = new AbortController();
  setBusy(true);
  $("status").textContent = "generating…";
  const started = performance.now();
  let tokens = 0;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: $("model").value, messages, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({ error: { message: resp.statusText } }));
      throw new Error(`${resp.status}: ${err.error ? err.error.message : resp.statusText}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            tokens += 1;
            div.dataset.chunks = String(tokens);
            body.innerHTML = renderMarkdown(answer);
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const secs = (performance.now() - started) / 1000;
    $("status").textContent = `done (${finish || "?"}), ${tokens} chunks in ${secs.toFixed(1)} s`;
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    div.dataset.finish = finish || "";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
      state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    } else {
      div.classList.add("error");
      body.textContent = String(e.message || e);
      $("status").textContent = "error";
      if (String(e.message).startsWith("401")) $("key-label").classList.remove("hidden");
    }
  } finally {
    div.classList.remove("streaming");
    div.classList.add("done");
    state.controller = null;
    setBusy(false);
  }
}

async function loadInfo() {
  const resp = await fetch("/info");
  const info = await resp.json();
  $("title").textContent = info.name;
  document.title = info.name + " — llm-installer";
  const select = $("model");
  select.replaceChildren();
  for (const name of info.models) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name.endsWith(":lora") ? name + " (adapter)" : name + " (base)";
    select.append(opt);
  }
  select.value = info.default_model;
  const rows = [
    ["model id", info.model_id], ["family", info.family], ["parameters", info.parameters],
    ["context length", info.context_length], ["dtype", info.dtype], ["device", info.device],
    ["adapter", info.adapter || "none"], ["adapter merged", info.merged_adapter ? "yes" : "no"],
  ];
  if (info.adapter_info) rows.push(["adapter info", JSON.stringify(info.adapter_info)]);
  const dl = $("info");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    if (v === null || v === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
  state.authRequired = info.auth_required;
  if (info.auth_required) {
    $("key-label").classList.remove("hidden");
    $("api-key").value = sessionStorage.getItem("llm-installer-key") || "";
  }
  $("status").textContent = "ready";
  document.body.dataset.state = "idle";
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("reset").addEventListener("click", () => {
    state.history = [];
    $("log").replaceChildren();
    $("status").textContent = "new conversation";
  });
  $("model").addEventListener("change", () => {
    $("status").textContent = "now talking to " + $("model").value;
  });
  $("api-key").addEventListener("change", () => sessionStorage.setItem("llm-installer-key", $("api-key").value));
  loadInfo().catch((e) => { $("status").textContent = "could not load model info: " + e; });
});
