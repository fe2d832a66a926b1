// The web chat page of `darkhorse serve`: plain JS, no build step, no CDN. It speaks the same
// OpenAI-style API as any other client (POST /v1/chat/completions with stream: true) and renders the
// server-sent events as they arrive: `reasoning_content` deltas into a foldable think block, `content`
// deltas into the reply. The conversation lives in this page; each request sends all of it.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // [{role, content}] sent with every request; reasoning is not sent back
let controller = null; // AbortController of the reply in flight
let model; // the id /v1/models lists first

// Settings survive a reload (the API key included: it stays in this browser's storage).
for (const id of ["system", "api-key", "max-tokens", "temperature", "think"]) {
  const field = $(id);
  const property = field.type === "checkbox" ? "checked" : "value";
  const saved = localStorage.getItem(`darkhorse.${id}`);
  if (saved !== null) field[property] = property === "checked" ? saved === "true" : saved;
  field.addEventListener("change", () => localStorage.setItem(`darkhorse.${id}`, field[property]));
}

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function errorMessage(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error.message || message;
  } catch {} // not OpenAI's error shape: the status line says enough
  const hint = response.status === 401 ? " (set the API key under Settings)" : "";
  return `${response.status} ${message}${hint}`;
}

async function loadModel() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (error) {
    $("model").textContent = `cannot reach the server (${error.message})`;
    return;
  }
  if (response.ok) {
    const ids = (await response.json()).data.map((entry) => entry.id);
    model = ids[0];
    $("model").textContent = ids.join(", ");
  } else {
    $("model").textContent = await errorMessage(response);
  }
}

// Yields the data of each server-sent event (the lines after "data:", joined), across chunk boundaries.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"));
      if (data.length) yield data.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
    }
  }
}

function addMessage(role, text = "") {
  const node = document.createElement("div");
  node.className = `msg ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  node.append(content);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// The think block: open while the model reasons, folded once the answer starts (a click reopens it).
function thinkBlock(node) {
  let block = node.querySelector(".think");
  if (!block) {
    block = document.createElement("details");
    block.className = "think";
    block.open = true;
    block.innerHTML = "<summary>Thinking…</summary><div class=\"reasoning\"></div>";
    node.prepend(block);
  }
  return block;
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const node = addMessage("assistant");
  node.classList.add("streaming");
  const content = node.querySelector(".content");
  const system = $("system").value.trim();
  const body = {
    model,
    messages: system ? [{ role: "system", content: system }, ...conversation] : conversation,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value),
    chat_template_kwargs: { enable_thinking: $("think").checked }, // vLLM's name for the template's switch
  };
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let usage = null;
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      usage = chunk.usage || usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) thinkBlock(node).querySelector(".reasoning").textContent += delta.reasoning_content;
      if (delta.content) {
        const block = node.querySelector(".think");
        if (block && !content.textContent) {
          block.open = false;
          block.querySelector("summary").textContent = "Thought";
        }
        content.textContent += delta.content;
      }
      finish = choice.finish_reason || finish;
      node.scrollIntoView({ block: "end" });
    }
    finishReply(node, usage, finish, started);
  } catch (error) {
    if (error.name === "AbortError") return finishReply(node, usage, "stopped", started);
    conversation.pop(); // the turn failed: it leaves the conversation, and its text goes back to the input box
    node.classList.add("error");
    content.textContent = `error: ${error.message}`;
    if (!$("prompt").value) $("prompt").value = text;
  } finally {
    node.classList.remove("streaming");
    node.dataset.done = "true";
    controller = null;
    setBusy(false);
  }
}

function finishReply(node, usage, finish, started) {
  const answer = node.querySelector(".content").textContent;
  conversation.push({ role: "assistant", content: answer });
  const block = node.querySelector(".think");
  if (block) block.querySelector("summary").textContent = "Thought";
  const stats = document.createElement("div");
  stats.className = "stats";
  const seconds = (performance.now() - started) / 1000;
  const tokens = usage ? `${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tok/s, ` : "";
  stats.textContent = `${tokens}${seconds.toFixed(1)} s${finish ? `, ${finish}` : ""}`;
  node.append(stats);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  $("prompt").focus();
});
$("api-key").addEventListener("change", loadModel);
loadModel();
