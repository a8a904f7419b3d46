// medrelay's demo page: sign in, send a document, follow its job, read the result, delete it.
// Plain JavaScript, served from the binary; it talks to this server only (its CSP says so).
"use strict";

const $ = (id) => document.getElementById(id);
let token = null;
let job = null;
let lastFile = null;
let follow = null;
let expiryTimer = null;
let sending = null;

function show(id, visible) { $(id).hidden = !visible; }

function problemText(body, fallback) {
  return body && typeof body.detail === "string" ? body.detail : fallback;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

// --- sign in ---------------------------------------------------------------------------------

async function offerDevSignin() {
  try {
    const r = await fetch("/demo/token", { method: "OPTIONS" });
    if (r.status === 204) show("dev-signin", true);
  } catch (_) { /* no development tokens here */ }
}

function signedIn(newToken, who) {
  token = newToken;
  $("who").textContent = who;
  show("signin", false);
  show("upload", true);
}

$("dev-signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  const user = $("user").value.trim();
  const r = await fetch("/demo/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    $("signin-error").textContent = problemText(body, "Signing in failed.");
    show("signin-error", true);
    return;
  }
  signedIn(body.token, user);
});

$("token-signin").addEventListener("submit", (e) => {
  e.preventDefault();
  signedIn($("token").value.trim(), "the token's user");
});

// --- upload ----------------------------------------------------------------------------------

function upload(file) {
  // One upload at a time: a new one replaces the one still running.
  if (sending) sending.abort();
  lastFile = file;
  show("upload-error", false);
  show("job", false);
  const bar = $("progress");
  bar.value = 0;
  show("progress", true);
  const xhr = new XMLHttpRequest();
  sending = xhr;
  xhr.open("POST", "/v1/documents");
  xhr.setRequestHeader("Authorization", "Bearer " + token);
  xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
  xhr.onload = () => {
    sending = null;
    show("progress", false);
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status !== 202) {
      $("upload-error").textContent = problemText(body, "The upload failed. Please try again.");
      show("upload-error", true);
      return;
    }
    startJob(body);
  };
  xhr.onerror = () => {
    sending = null;
    show("progress", false);
    $("upload-error").textContent = "The connection broke off. Please check your network and try again.";
    show("upload-error", true);
  };
  xhr.send(file);
}

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  // Cleared, so that choosing the same file again (after an error) sends it again.
  $("file").value = "";
  if (file) upload(file);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
});

// --- the job ---------------------------------------------------------------------------------

function startJob(first) {
  if (follow) follow.abort();
  job = first;
  show("job", true);
  show("deleted", false);
  show("delete", true);
  show("result", false);
  show("failure", false);
  render(first);
  clearInterval(expiryTimer);
  expiryTimer = setInterval(() => job && renderTimes(job), 1000);
  follow = new AbortController();
  followEvents(first.id, follow.signal);
}

// Server-sent events through fetch (EventSource cannot send the Authorization header); polling
// with Retry-After when the stream is not available.
async function followEvents(id, signal) {
  try {
    const r = await api(`/v1/jobs/${id}/events`, { signal, headers: { Accept: "text/event-stream" } });
    if (!r.ok || !r.body) throw new Error("no stream");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) render(JSON.parse(data));
      }
    }
    if (!isTerminal(job)) poll(id, signal);
  } catch (e) {
    if (!signal.aborted) poll(id, signal);
  }
}

async function poll(id, signal) {
  let backoff = 1;
  while (!signal.aborted) {
    const r = await api(`/v1/jobs/${id}`, { signal }).catch(() => null);
    if (signal.aborted) return;
    let wait = backoff;
    if (r && r.status === 200) {
      const body = await r.json();
      render(body);
      if (isTerminal(body)) return;
      wait = Number(r.headers.get("Retry-After") || "1");
      backoff = 1;
    } else if (r && (r.status === 404 || r.status === 410)) {
      gone(r.status === 410 ? "expired" : "deleted");
      return;
    } else {
      // Offline, overloaded (429) or unavailable (503): try again, later each time.
      wait = Number((r && r.headers.get("Retry-After")) || backoff);
      backoff = Math.min(backoff * 2, 30);
    }
    await new Promise((ok) => setTimeout(ok, Math.max(1, wait) * 1000));
  }
}

// The job no longer exists: deleted (here or elsewhere) or past its hour.
function gone(how) {
  clearInterval(expiryTimer);
  show("result", false);
  show("failure", false);
  show("delete", false);
  $("status").textContent = how;
  $("status").dataset.status = how;
  $("retry-in").textContent = "";
  $("expires").textContent = "0 min 0 s";
  show("deleted", true);
}

function isTerminal(j) { return j && (j.status === "succeeded" || j.status === "failed"); }

const STATUS = {
  queued: "queued",
  processing: "processing",
  retry_scheduled: "waiting to retry",
  succeeded: "succeeded",
  failed: "failed",
};

function render(j) {
  job = j;
  $("status").textContent = STATUS[j.status] || j.status;
  $("status").dataset.status = j.status;
  renderTimes(j);
  if (j.status === "failed" && j.error) {
    $("failure-message").textContent = j.error.message;
    $("retry").hidden = !j.error.retryable || !lastFile;
    show("failure", true);
  }
  if (j.status === "succeeded" && j.result) renderResult(j.result);
}

// The countdowns, every second: to the next attempt, and to the deletion of everything.
function renderTimes(j) {
  if (j.status === "retry_scheduled" && j.next_attempt_at) {
    const wait = Math.max(0, Math.round((Date.parse(j.next_attempt_at) - Date.now()) / 1000));
    $("retry-in").textContent = `(retry in ${wait} s)`;
  } else {
    $("retry-in").textContent = "";
  }
  const secs = Math.max(0, Math.round((Date.parse(j.expires_at) - Date.now()) / 1000));
  $("expires").textContent = `${Math.floor(secs / 60)} min ${secs % 60} s`;
  if (secs === 0) gone("expired");
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
}

function fill(tableId, items, columns) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const item of items || []) {
    const row = document.createElement("tr");
    for (const column of columns) cell(row, ...column(item));
    body.appendChild(row);
  }
  if (!items || items.length === 0) {
    const row = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns.length;
    td.textContent = "none found";
    row.appendChild(td);
    body.appendChild(row);
  }
}

function renderResult(result) {
  const doc = result.document || {};
  $("doc-type").textContent = (doc.type || "other").replace(/_/g, " ");
  $("doc-date").textContent = doc.date || "unknown";
  $("doc-pages").textContent = doc.page_count == null ? "—" : String(doc.page_count);
  $("doc-summary").textContent = result.summary || "—";
  fill("medications", result.medications, [
    (m) => [m.name], (m) => [m.dose], (m) => [m.frequency], (m) => [m.route],
  ]);
  fill("labs", result.lab_results, [
    (l) => [l.test], (l) => [l.value], (l) => [l.unit], (l) => [l.reference_range],
    (l) => [l.flag || "", l.flag ? `flag-${l.flag}` : ""],
  ]);
  fill("diagnoses", result.diagnoses, [
    (d) => [d.description], (d) => [[d.code_system, d.code].filter(Boolean).join(" ")],
  ]);
  show("result", true);
}

$("retry").addEventListener("click", () => { if (lastFile) upload(lastFile); });

$("delete").addEventListener("click", async () => {
  if (!job) return;
  const id = job.id;
  const r = await api(`/v1/jobs/${id}`, { method: "DELETE" }).catch(() => null);
  if (!job || job.id !== id) return;
  // Gone either way: deleted now, or already deleted or expired.
  if (r && (r.status === 204 || r.status === 404 || r.status === 410)) {
    if (follow) follow.abort();
    gone("deleted");
  } else {
    $("failure-message").textContent = "Deleting did not work right now. Please try again in a moment.";
    $("retry").hidden = true;
    show("failure", true);
  }
});

offerDevSignin();
