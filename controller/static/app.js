// The streamsaga dashboard: plain JavaScript, no build step, no dependencies.
//
// Data comes from the controller's own API (docs/api.md). Live updates come from the
// Server-Sent Events feed GET /v1/events, read with fetch() rather than EventSource:
// the feed names each event after its history line type (PaymentCaptured, TimerFired,
// …), which EventSource only delivers to a listener registered for that exact name,
// and fetch can also send an Authorization header and tell a missing route (404)
// from a dropped connection. Without the feed, or while it reconnects, the page polls.
//
// Every string from the API reaches the page through textContent or an attribute,
// never as HTML.

const STATUSES = ["running", "compensating", "needs_attention", "completed", "compensated", "failed"];
const FINISHED = new Set(["completed", "compensated", "failed"]);
const RECENT_LIMIT = 50;
const POLL_MS = 2000; // REST polling while the live feed is unavailable
const SIDE_POLL_MS = 5000; // participants and dead letters have no feed
const RECONNECT_MAX_MS = 10000;
const FEED_RETRY_MISSING_MS = 30000; // how often to look again for a feed the controller does not serve
const TOKEN_KEY = "streamsaga.token";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  filter: "",
  recent: new Map(), // workflow_id -> summary, as GET /v1/workflows lists them
  counts: null, // status ("" for all) -> workflows, as GET /v1/stats counts them
  selected: null, // the workflow whose timeline is open
  detail: null, // {workflow, events} of the selected workflow
  mode: "connecting",
  lastEventId: "",
  feed: null, // AbortController of the live feed's request
};

// --- DOM helpers -------------------------------------------------------------------

/** An element with properties, attributes and children; strings become text nodes. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") for (const [name, v] of Object.entries(value)) el.style.setProperty(name, v);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const $ = (selector) => document.querySelector(selector);

/** Put ``rows`` into ``tbody`` in order, moving only what changed (so focus survives updates). */
function syncRows(tbody, rows) {
  rows.forEach((row, i) => {
    if (tbody.children[i] !== row) tbody.insertBefore(row, tbody.children[i] || null);
  });
  while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
}

/** Rows keyed by ``key``; a row is rebuilt only when its item changed. */
function keyedRows(tbody, items, key, build) {
  const old = new Map();
  for (const tr of tbody.children) if (tr.dataset.key) old.set(tr.dataset.key, tr);
  return items.map((item) => {
    const k = key(item);
    const signature = JSON.stringify(item);
    const previous = old.get(k);
    if (previous && previous.dataset.signature === signature) return previous;
    const tr = build(item);
    tr.dataset.key = k;
    tr.dataset.signature = signature;
    return tr;
  });
}

function emptyRow(columns, text) {
  return h("tr", { class: "empty-row" }, h("td", { colspan: columns }, text));
}

// --- formatting --------------------------------------------------------------------

const ms = (iso) => (iso ? Date.parse(iso) : NaN);

function formatDuration(millis) {
  if (!Number.isFinite(millis)) return "–";
  const m = Math.max(0, millis);
  if (m < 1000) return `${Math.round(m)} ms`;
  if (m < 10000) return `${(m / 1000).toFixed(2)} s`;
  if (m < 60000) return `${(m / 1000).toFixed(1)} s`;
  const s = Math.round(m / 1000);
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function formatAgo(iso) {
  const d = Date.now() - ms(iso);
  if (!Number.isFinite(d)) return "–";
  if (d < 5000) return "just now";
  if (d < 60000) return `${Math.round(d / 1000)} s ago`;
  if (d < 3600000) return `${Math.round(d / 60000)} min ago`;
  if (d < 86400000) return `${Math.round(d / 3600000)} h ago`;
  return `${Math.round(d / 86400000)} d ago`;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });

function formatTime(iso) {
  const t = ms(iso);
  if (!Number.isFinite(t)) return "–";
  const date = new Date(t);
  const sameDay = new Date().toDateString() === date.toDateString();
  return sameDay ? timeFormat.format(date) : `${dayFormat.format(date)} ${timeFormat.format(date)}`;
}

function time(iso) {
  return h("time", { datetime: iso, title: iso }, formatTime(iso));
}

const statusText = (status) => String(status).replaceAll("_", " ");
const shortId = (id) => (id.length > 12 ? `${id.slice(0, 10)}…` : id);

function badge(status, extraClass = "") {
  return h("span", { class: `badge status ${extraClass} status-${status}`, dataset: { status } }, statusText(status));
}

function workflowLink(id) {
  return h("a", { class: "wid", href: `#/workflows/${encodeURIComponent(id)}`, title: id }, shortId(id));
}

/** A duration that keeps counting while ``to`` is unknown (see tick()). */
function liveDuration(from, to) {
  const el = h("span", { class: "num" }, formatDuration(ms(to || new Date().toISOString()) - ms(from)));
  if (!to) el.dataset.tickFrom = from;
  return el;
}

// --- the API -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 401 || response.status === 403) showAuth();
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  markReachable();
  return data;
}

const workflowPath = (id) => `/v1/workflows/${encodeURIComponent(id)}`;

// --- connection state and notices --------------------------------------------------

const MODE_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  polling: `Polling every ${POLL_MS / 1000} s`,
  reconnecting: "Reconnecting…",
  offline: "Controller unreachable",
};

function setMode(mode) {
  if (state.mode === mode) return;
  state.mode = mode;
  $("#connection").dataset.mode = mode;
  document.body.dataset.connection = mode; // the page greys out what it can no longer vouch for
  $("#connection-text").textContent = MODE_TEXT[mode];
}

function markReachable() {
  if (state.mode === "offline") setMode(state.feed ? "reconnecting" : "polling");
}

function markUnreachable(error) {
  if (!(error instanceof ApiError)) setMode("offline");
}

let noticeTimer = null;

function notify(text, kind = "ok") {
  const el = $("#notice");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    el.hidden = true;
  }, 10000);
}

function showAuth() {
  $("#auth").hidden = false;
}

// --- coalescing refreshes ----------------------------------------------------------

/** One run at a time of an async ``fn``; calls during a run make it run once more after. */
function single(fn) {
  let running = null;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          try {
            await fn();
          } catch (error) {
            markUnreachable(error);
            console.warn(error);
          }
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  return run;
}

/** ``fn`` at most once per ``delay`` ms, ``delay`` ms after the first call of a burst. */
function coalesce(fn, delay) {
  let timer = null;
  return () => {
    if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        fn();
      }, delay);
    }
  };
}

// --- counts ------------------------------------------------------------------------

const refreshStats = single(async () => {
  const { counts, total } = await api("/v1/stats");
  state.counts = { ...counts, "": total };
  renderRecentMore();
  for (const button of document.querySelectorAll("[data-count]")) {
    const key = button.dataset.count;
    const value = key === "total" ? total : counts[key] ?? 0;
    button.querySelector(".count-value").textContent = String(value);
    button.classList.toggle("zero", value === 0);
  }
  const attention = counts.needs_attention ?? 0;
  document.title = attention ? `(${attention}) streamsaga` : "streamsaga";
});

function setFilter(status) {
  state.filter = status;
  $("#status-filter").value = status;
  for (const button of document.querySelectorAll("[data-count]")) {
    const key = button.dataset.count === "total" ? "" : button.dataset.count;
    button.setAttribute("aria-pressed", String(key === status));
  }
  state.recent.clear();
  renderRecent();
  refreshRecent();
}

// --- recent workflows --------------------------------------------------------------

const refreshRecent = single(async () => {
  const query = new URLSearchParams({ limit: String(RECENT_LIMIT) });
  if (state.filter) query.set("status", state.filter);
  const filter = state.filter;
  const { workflows } = await api(`/v1/workflows?${query}`);
  if (filter !== state.filter) return; // the filter changed meanwhile; its own refresh follows
  state.recent = new Map(workflows.map((w) => [w.workflow_id, w]));
  renderRecent();
});

function recentRow(w) {
  return h(
    "tr",
    { dataset: { workflowId: w.workflow_id }, class: w.workflow_id === state.selected ? "selected" : null },
    h("td", {}, workflowLink(w.workflow_id), h("div", { class: "muted small" }, `${w.workflow.name} v${w.workflow.version}`)),
    h("td", {}, badge(w.status)),
    h("td", { class: "nowrap" }, time(w.created_at)),
    h("td", { class: "num" }, liveDuration(w.created_at, w.finished_at)),
    h("td", { class: "ago", dataset: { ago: w.updated_at } }, formatAgo(w.updated_at)),
    h("td", { class: "error-cell", title: w.error || null }, w.error || ""),
  );
}

function renderRecent() {
  const tbody = $("#recent tbody");
  const items = [...state.recent.values()]
    .sort((a, b) => ms(b.updated_at) - ms(a.updated_at))
    .slice(0, RECENT_LIMIT)
    .map((w) => ({ ...w, selected: w.workflow_id === state.selected }));
  if (!items.length) {
    const none = state.filter === "needs_attention" ? "No workflow needs attention." : `No ${statusText(state.filter)} workflows.`;
    const text = state.filter ? none : "No workflows yet: POST /v1/orders starts one.";
    syncRows(tbody, [emptyRow(6, text)]);
    return;
  }
  syncRows(tbody, keyedRows(tbody, items, (w) => w.workflow_id, recentRow));
  renderRecentMore();
}

/** Under the list, when it cannot show them all: how many there are. */
function renderRecentMore() {
  const shown = Math.min(state.recent.size, RECENT_LIMIT);
  const all = state.counts?.[state.filter] ?? 0;
  const more = $("#recent-more");
  more.hidden = all <= shown;
  more.textContent = `The ${shown} most recently updated of ${all}; a workflow's own page is #/workflows/<id>.`;
}

/** Re-fetch the summaries of workflows that had news, a burst at a time. */
const pendingSummaries = new Set();
const refreshSummaries = single(async () => {
  const ids = [...pendingSummaries];
  pendingSummaries.clear();
  const found = await Promise.all(
    ids.map((id) =>
      api(workflowPath(id)).catch((error) => {
        if (error instanceof ApiError && error.status === 404) return null;
        throw error;
      }),
    ),
  );
  for (const [i, detail] of found.entries()) {
    if (!detail) {
      state.recent.delete(ids[i]);
      continue;
    }
    if (state.filter && detail.status !== state.filter) state.recent.delete(detail.workflow_id);
    else state.recent.set(detail.workflow_id, summaryOf(detail));
  }
  renderRecent();
});
const refreshSummariesSoon = coalesce(refreshSummaries, 150);

function summaryOf(detail) {
  const { workflow_id, workflow, status, created_at, updated_at, finished_at, error, links } = detail;
  return { workflow_id, workflow, status, created_at, updated_at, finished_at, error, links };
}

// --- the timeline of one workflow --------------------------------------------------

const refreshDetail = single(async () => {
  const id = state.selected;
  if (!id) return;
  try {
    const [workflow, history] = await Promise.all([api(workflowPath(id)), api(`${workflowPath(id)}/history`)]);
    if (id !== state.selected) return;
    state.detail = { workflow, events: history.events };
  } catch (error) {
    if (!(error instanceof ApiError) || id !== state.selected) throw error;
    state.detail = { error };
  }
  renderDetail();
});
const refreshDetailSoon = coalesce(refreshDetail, 200);

function select(id) {
  state.selected = id;
  state.detail = null;
  $("#detail-close").hidden = !id;
  renderRecent();
  renderDetail();
  if (id) {
    refreshDetail();
    $("#detail").scrollIntoView({ block: "nearest", behavior: "smooth" });
  }
}

function renderDetail() {
  const body = $("#detail-body");
  const id = state.selected;
  if (!id) {
    $("#detail-title").textContent = "Workflow timeline";
    body.replaceChildren(h("p", { class: "empty" }, "Select a workflow to see its steps, deadlines and compensations."));
    return;
  }
  $("#detail-title").textContent = `Workflow ${shortId(id)}`;
  if (!state.detail) {
    body.replaceChildren(h("p", { class: "empty" }, "Loading…"));
    return;
  }
  if (state.detail.error) {
    const { error } = state.detail;
    const text = error.status === 404 ? `No workflow ${id}: it never existed or has expired.` : error.message;
    body.replaceChildren(h("p", { class: "empty error-text" }, text));
    return;
  }
  const { workflow: w, events } = state.detail;
  const keepOpen = body.querySelector("details.history")?.open ?? true;
  const scrolled = body.querySelector(".history .table-wrap")?.scrollTop ?? 0;
  body.replaceChildren(detailHeader(w), timeline(w, events), historyTable(w, events, keepOpen));
  body.querySelector(".history .table-wrap").scrollTop = scrolled;
}

function detailHeader(w) {
  const end = w.finished_at;
  const facts = [
    ["Workflow id", h("code", { class: "full-id" }, w.workflow_id)],
    ["Definition", `${w.workflow.name} v${w.workflow.version}`],
    ["Started", time(w.created_at)],
    ...(end ? [["Finished", time(end)], ["Took", liveDuration(w.created_at, end)]] : [["Open for", liveDuration(w.created_at, null)]]),
  ];
  if (w.sla_deadline_at) {
    facts.push([
      "SLA deadline",
      h(
        "span",
        {},
        time(w.sla_deadline_at),
        w.sla_breached ? h("span", { class: "flag breached" }, "breached") : h("span", { class: "flag met" }, end ? "met" : "open"),
      ),
    ]);
  }
  const actions = h("div", { class: "actions" });
  if (w.status === "needs_attention") actions.append(retryButton(w.workflow_id));
  return h(
    "div",
    { class: "detail-head" },
    h("div", { class: "detail-status" }, badge(w.status, "large"), actions),
    w.error ? h("p", { class: "error-text", role: "note" }, w.error) : null,
    h(
      "dl",
      { class: "facts" },
      facts.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))),
    ),
  );
}

/** Step rows with bars on one time axis: the run, the compensation, the deadline. */
function timeline(w, events) {
  const t0 = ms(w.created_at);
  const now = Date.now();
  const stamps = [ms(w.finished_at) || now];
  for (const step of w.steps) {
    for (const key of ["started_at", "finished_at", "compensation_started_at", "compensated_at"]) {
      if (step[key]) stamps.push(ms(step[key]));
    }
  }
  for (const event of events) stamps.push(ms(event.at));
  if (!FINISHED.has(w.status)) {
    for (const step of w.steps) if (step.deadline_at) stamps.push(ms(step.deadline_at)); // the axis reaches them
  }
  const span = Math.max(1, Math.max(...stamps.filter(Number.isFinite)) - t0);
  const at = (t) => Math.min(100, Math.max(0, ((t - t0) / span) * 100));
  const bar = (cls, from, to, label) =>
    h("span", {
      class: `bar ${cls}`,
      title: label,
      style: { left: `${at(from)}%`, width: `max(3px, ${at(to) - at(from)}%)` },
    });

  const rows = w.steps.map((step) => {
    const track = h("div", { class: "track", "aria-hidden": "true" });
    const facts = [];
    if (step.started_at) {
      const end = ms(step.finished_at) || (FINISHED.has(w.status) ? ms(w.finished_at) : now);
      const took = end - ms(step.started_at);
      // a step being undone had completed: its run shows as completed, its undoing as hatched
      const outcome = step.compensation_started_at ? "completed" : step.status;
      track.append(bar(`run step-${outcome}`, ms(step.started_at), end, `${step.name}: ${formatDuration(took)}`));
      facts.push(h("span", {}, step.finished_at ? "took " : "running for ", h("strong", { class: "num" }, formatDuration(took))));
    }
    if (step.compensation_started_at) {
      const end = ms(step.compensated_at) || (FINISHED.has(w.status) ? ms(w.finished_at) : now);
      const took = end - ms(step.compensation_started_at);
      track.append(bar("comp", ms(step.compensation_started_at), end, `compensating ${step.name}: ${formatDuration(took)}`));
      facts.push(
        h("span", { class: "comp-text" }, step.compensated_at ? "undone in " : "undoing for ", h("strong", { class: "num" }, formatDuration(took))),
      );
    }
    if (step.deadline_at && !FINISHED.has(w.status)) {
      const deadline = ms(step.deadline_at);
      const what = step.retrying ? "next try" : "deadline"; // a compensation waiting to try again
      track.append(h("span", { class: "marker deadline", title: what, style: { left: `${at(deadline)}%` } }));
      facts.push(h("span", { class: "deadline-text" }, `${what} `, time(step.deadline_at)));
    }
    if (step.attempts > 1 || step.retrying) {
      facts.push(h("span", {}, `attempt ${step.attempts}${step.retrying ? ", retrying" : ""}`));
    }
    if (step.error) facts.push(h("span", { class: "error-text" }, step.error));
    return h(
      "li",
      { class: "step", dataset: { step: step.name, status: step.status } },
      h("div", { class: "step-name" }, h("strong", {}, step.name), h("span", { class: "participant" }, step.participant)),
      h("div", { class: "step-state" }, badge(step.status)),
      track,
      h("div", { class: "step-facts" }, facts.length ? facts : h("span", { class: "muted" }, "not started")),
    );
  });

  const ticks = [0, 0.5, 1].map((f) =>
    h("span", { class: "tick", style: { left: `${f * 100}%` } }, f === 0 ? "0" : `+${formatDuration(span * f)}`),
  );
  return h(
    "section",
    { class: "timeline", "aria-label": "Steps" },
    h("h3", {}, "Steps"),
    h("ol", { class: "steps" }, rows),
    h("div", { class: "axis", "aria-hidden": "true" }, ticks),
    h(
      "p",
      { class: "legend", "aria-hidden": "true" },
      h("span", { class: "key run" }),
      "step ",
      h("span", { class: "key comp" }),
      "compensation ",
      h("span", { class: "key deadline" }),
      "deadline",
    ),
  );
}

function historyTable(w, events, open) {
  const t0 = ms(w.created_at);
  // a line's detail gets a row of its own under it: as a column it was pushed out of the panel
  const rows = events.flatMap((e) => [
    h(
      "tr",
      { class: e.detail ? "has-detail" : null, dataset: { seq: e.seq, direction: e.direction } },
      h("td", { class: "num" }, String(e.seq)),
      h("td", { class: "num", title: e.at }, `+${formatDuration(ms(e.at) - t0)}`),
      h(
        "td",
        {},
        h(
          "div",
          { class: "nowrap" },
          h("span", { class: `direction ${e.direction}`, title: e.direction === "in" ? "received" : "sent" }, e.direction),
          " ",
          h("span", { class: "type" }, e.type),
        ),
        h("div", { class: "muted small" }, e.direction === "in" ? `from ${e.producer}` : `by ${e.producer}`),
      ),
      h("td", {}, e.step ? `${e.step}${e.step_status ? ` → ${statusText(e.step_status)}` : ""}` : ""),
      h("td", {}, badge(e.status, "small")),
    ),
    e.detail ? h("tr", { class: "detail-row" }, h("td"), h("td", { colspan: 4, class: "detail-cell" }, e.detail)) : null,
  ]).filter(Boolean);
  return h(
    "details",
    { class: "history", open },
    h("summary", {}, `History (${events.length} messages)`),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "data compact" },
        h("caption", { class: "visually-hidden" }, "Every message the workflow received or sent, in order"),
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["#", "At", "Message", "Step", "Workflow"].map((c) => h("th", { scope: "col" }, c)),
          ),
        ),
        h("tbody", {}, rows),
      ),
    ),
  );
}

// --- operator actions --------------------------------------------------------------

function retryButton(id) {
  return h(
    "button",
    {
      type: "button",
      class: "button primary retry",
      dataset: { workflowId: id },
      "aria-label": `Retry the compensation of workflow ${id}`,
      onclick: (event) => retry(id, event.currentTarget),
    },
    "Retry",
  );
}

async function retry(id, button) {
  button.disabled = true;
  try {
    const updated = await api(`${workflowPath(id)}/retry`, {
      method: "POST",
      body: { by: "dashboard", reason: "retried from the dashboard" },
    });
    notify(`Retry requested for workflow ${shortId(id)}: now ${statusText(updated.status)}.`);
    if (state.selected === id) {
      state.detail = null;
      refreshDetail();
    }
  } catch (error) {
    notify(`Retry of workflow ${shortId(id)} failed: ${error.message}`, "error");
    button.disabled = false;
  }
  refreshAttention();
  refreshStats();
  pendingSummaries.add(id);
  refreshSummariesSoon();
}

async function purge(letter, button) {
  if (!window.confirm(`Delete dead letter ${letter.id} for good? Its message is lost.`)) return;
  button.disabled = true;
  try {
    await api(`/v1/dead-letters/${encodeURIComponent(letter.id)}`, { method: "DELETE" });
    notify(`Purged dead letter ${letter.id}.`);
  } catch (error) {
    notify(`Purge of dead letter ${letter.id} failed: ${error.message}`, "error");
    button.disabled = false;
  }
  refreshDeadLetters();
}

async function replay(letter, button) {
  button.disabled = true;
  try {
    const result = await api(`/v1/dead-letters/${encodeURIComponent(letter.id)}/replay`, { method: "POST" });
    notify(`Replayed dead letter ${letter.id} to ${result.stream} as ${result.entry_id}.`);
  } catch (error) {
    notify(`Replay of dead letter ${letter.id} failed: ${error.message}`, "error");
    button.disabled = false;
  }
  refreshDeadLetters();
}

// --- needs attention ---------------------------------------------------------------

const refreshAttention = single(async () => {
  const { workflows } = await api("/v1/workflows?status=needs_attention&limit=100");
  $("#attention-count").textContent = String(workflows.length);
  $("#attention").classList.toggle("has-items", workflows.length > 0);
  const tbody = $("#attention tbody");
  if (!workflows.length) {
    syncRows(tbody, [emptyRow(5, "Nothing needs attention.")]);
    return;
  }
  const rows = keyedRows(tbody, workflows, (w) => w.workflow_id, (w) =>
    h(
      "tr",
      { dataset: { workflowId: w.workflow_id } },
      h("td", {}, workflowLink(w.workflow_id)),
      h("td", {}, `${w.workflow.name} v${w.workflow.version}`),
      h("td", { class: "ago", dataset: { ago: w.updated_at } }, formatAgo(w.updated_at)),
      h("td", { class: "error-cell wrap" }, w.error || ""),
      h("td", { class: "action" }, retryButton(w.workflow_id)),
    ),
  );
  syncRows(tbody, rows);
});
const refreshAttentionSoon = coalesce(refreshAttention, 200);

// --- participants and dead letters -------------------------------------------------

const refreshParticipants = single(async () => {
  const found = await api("/v1/participants");
  const tbody = $("#participants tbody");
  const lagCells = (lag) => [
    h("td", { class: "num lag" }, String(lag.lag)),
    h("td", { class: "num" }, String(lag.pending)),
    h("td", { class: "num", title: lag.exact ? null : "at least" }, `${lag.exact ? "" : "≥ "}${lag.undelivered}`),
  ];
  const items = found.participants.map((p) => ({ ...p, consumers: p.consumers.map(({ name, live }) => ({ name, live })) }));
  const rows = keyedRows(tbody, items, (p) => p.name, (p) => {
    const live = p.consumers.filter((c) => c.live).length;
    return h(
      "tr",
      { dataset: { participant: p.name }, class: p.live ? null : "down" },
      h("th", { scope: "row" }, p.name, h("div", {}, h("span", { class: `liveness ${p.live ? "live" : "down"}` }, p.live ? "live" : "down"))),
      h("td", { class: "num", title: p.consumers.map((c) => `${c.name}${c.live ? "" : " (down)"}`).join(", ") }, `${live} / ${p.consumers.length}`),
      ...lagCells(p),
      h(
        "td",
        {},
        h(
          "div",
          { class: "subs" },
          p.subscriptions.map((s) =>
            h("span", { class: `sub${s.compensation ? " compensation" : ""}${s.live ? "" : " stale"}`, title: `lag ${s.lag}` }, s.type),
          ),
        ),
      ),
    );
  });
  const controller = found.controller;
  const controllerRow = h(
    "tr",
    { class: "controller-row", dataset: { participant: "controller" } },
    h("th", { scope: "row" }, "controller", h("div", { class: "muted small" }, "consumer group")),
    h("td", { class: "num" }, "–"),
    ...lagCells(controller),
    h("td", { class: "muted" }, `reads ${controller.types.length} event types`),
  );
  syncRows(tbody, rows.length ? [...rows, controllerRow] : [emptyRow(6, "No worker has sent a heartbeat."), controllerRow]);

  const warnings = $("#uncovered");
  warnings.replaceChildren(
    ...found.uncovered.map((u) =>
      h(
        "li",
        {},
        `No live ${u.participant} worker handles ${u.type}: step ${u.step} of ${u.workflow} v${u.version} (${u.role})` +
          (u.lag ? `; ${u.exact ? "" : "at least "}${u.lag} waiting.` : "."),
      ),
    ),
  );
  warnings.hidden = found.uncovered.length === 0;
  $("#participants-updated").textContent = `updated ${timeFormat.format(new Date())}`;
});

/** A button that runs ``action(letter, button)`` on a dead letter. */
const letterButton = (letter, label, kind, action) =>
  h(
    "button",
    {
      type: "button",
      class: `button ${kind}`,
      "aria-label": `${label} dead letter ${letter.id}`,
      onclick: (event) => action(letter, event.currentTarget),
    },
    label,
  );

const refreshDeadLetters = single(async () => {
  const { dead_letters: letters } = await api("/v1/dead-letters?limit=50");
  $("#dead-letters-count").textContent = letters.length >= 50 ? "50+" : String(letters.length);
  $("#dead-letters").classList.toggle("has-items", letters.length > 0);
  const tbody = $("#dead-letters tbody");
  const items = letters.map(({ fields, ...rest }) => rest);
  const rows = keyedRows(tbody, items, (l) => l.id, (l) =>
    h(
      "tr",
      { dataset: { deadLetterId: l.id } },
      h("td", {}, time(l.failed_at)),
      h(
        "td",
        {},
        h("span", { class: "type" }, l.type || "?"),
        l.correlation_id ? h("div", {}, workflowLink(l.correlation_id)) : null,
      ),
      h("td", { title: l.consumer ? `consumer ${l.consumer}` : null }, l.group || ""),
      h("td", { class: "error-cell wrap" }, l.reason),
      h("td", { class: "num" }, String(l.deliveries ?? "")),
      h(
        "td",
        { class: "action" },
        letterButton(l, "Replay", "replay", replay),
        " ",
        letterButton(l, "Purge", "subtle purge", purge),
      ),
    ),
  );
  syncRows(tbody, rows.length ? rows : [emptyRow(6, "No dead letters.")]);
  $("#dead-letters-updated").textContent = `updated ${timeFormat.format(new Date())}`;
});

// --- the live feed -----------------------------------------------------------------

const refreshStatsSoon = coalesce(refreshStats, 250);

function onLine(line) {
  const id = line.workflow_id;
  if (!id) return;
  const known = state.recent.get(id);
  if (known) {
    const wasAttention = known.status === "needs_attention";
    state.recent.set(id, { ...known, status: line.status, updated_at: line.at || known.updated_at });
    if (wasAttention) refreshAttentionSoon();
    renderRecentSoon();
  }
  if (line.status === "needs_attention") refreshAttentionSoon();
  pendingSummaries.add(id);
  refreshSummariesSoon();
  refreshStatsSoon();
  if (id === state.selected) refreshDetailSoon();
}

const renderRecentSoon = coalesce(renderRecent, 50);

function onFeedEvent(type, data, id) {
  if (type === "gap") {
    // lines missed while away were trimmed before we came back: catch up over REST
    refreshAll();
    return;
  }
  if (type === "overflow") {
    // the server dropped us for falling behind: resume where it says and catch up over REST
    try {
      const body = JSON.parse(data);
      if (body.last_event_id) state.lastEventId = String(body.last_event_id);
    } catch {
      /* keep the last id we saw */
    }
    refreshAll();
    return;
  }
  if (id) state.lastEventId = id;
  let line;
  try {
    line = JSON.parse(data);
  } catch {
    return;
  }
  onLine(line);
}

/** Parse a text/event-stream body as the HTML standard says, calling ``onEvent(type, data, id)``. */
async function readEventStream(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  let lastId = state.lastEventId;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    let text = buffer + value;
    let held = "";
    if (text.endsWith("\r")) {
      held = "\r"; // maybe the first half of a CRLF split across chunks
      text = text.slice(0, -1);
    }
    const lines = text.split(/\r\n|\r|\n/);
    buffer = lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(type || "message", data.join("\n"), lastId);
        type = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let fieldValue = colon === -1 ? "" : line.slice(colon + 1);
      if (fieldValue.startsWith(" ")) fieldValue = fieldValue.slice(1);
      if (field === "event") type = fieldValue;
      else if (field === "data") data.push(fieldValue);
      else if (field === "id" && !fieldValue.includes("\0")) lastId = fieldValue;
    }
  }
}

async function followFeed() {
  let delay = 1000;
  for (;;) {
    const controller = new AbortController();
    state.feed = controller;
    let wait = delay;
    try {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const response = await fetch("/v1/events", { headers, signal: controller.signal, cache: "no-store" });
      const type = response.headers.get("Content-Type") || "";
      if (response.status === 404 || response.status === 405 || response.status === 501) {
        state.feed = null;
        setMode("polling"); // a controller without the feed: poll, and look again now and then
        wait = FEED_RETRY_MISSING_MS;
      } else if (!response.ok || !response.body || !type.startsWith("text/event-stream")) {
        if (response.status === 401 || response.status === 403) showAuth();
        throw new Error(`the live feed answered HTTP ${response.status}`);
      } else {
        setMode("live");
        delay = 1000;
        refreshAll(); // whatever happened while we were not connected
        await readEventStream(response.body, onFeedEvent);
        setMode("reconnecting"); // the server closed the stream (overflow, restart)
        wait = 250;
      }
    } catch (error) {
      if (state.mode !== "offline") setMode("reconnecting");
      if (controller.signal.aborted) wait = 0;
      else console.warn("live feed:", error);
      delay = Math.min(delay * 2, RECONNECT_MAX_MS);
    }
    await sleep(wait);
  }
}

const sleep = (millis) => new Promise((resolve) => setTimeout(resolve, millis));

/** Restart the feed now (say with a new token). */
function reconnectFeed() {
  if (state.feed) state.feed.abort();
}

// --- start-up ----------------------------------------------------------------------

function refreshCore() {
  refreshStats();
  refreshRecent();
  refreshAttention();
  if (state.selected) refreshDetail();
}

function refreshAll() {
  refreshCore();
  refreshParticipants();
  refreshDeadLetters();
}

/** Counting durations and relative times, every second. */
function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll("[data-tick-from]")) {
    el.textContent = formatDuration(now - ms(el.dataset.tickFrom));
  }
  for (const el of document.querySelectorAll("[data-ago]")) el.textContent = formatAgo(el.dataset.ago);
  const w = state.detail && state.detail.workflow;
  if (w && !FINISHED.has(w.status)) {
    // bars of what is still running grow; nothing else in the panel moves
    $("#detail-body section.timeline")?.replaceWith(timeline(w, state.detail.events));
  }
}

function route() {
  const match = location.hash.match(/^#\/workflows\/([^/]+)$/);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id !== state.selected) select(id);
}

function start() {
  for (const button of document.querySelectorAll("[data-count]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.count === "total" ? "" : button.dataset.count;
      setFilter(state.filter === key ? "" : key);
    });
  }
  $("#status-filter").addEventListener("change", (event) => setFilter(event.target.value));
  $("#auth").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#auth-token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("#auth").hidden = true;
    refreshAll();
    reconnectFeed();
  });
  window.addEventListener("hashchange", route);
  route();
  renderRecent();
  refreshAll();
  followFeed();
  setInterval(() => {
    if (state.mode !== "live") refreshCore();
  }, POLL_MS);
  setInterval(() => {
    refreshParticipants();
    refreshDeadLetters();
    if (state.mode === "live") refreshStats(); // the feed says what changed; this bounds any drift
  }, SIDE_POLL_MS);
  setInterval(tick, 1000);
}

start();
