// ppml dashboard: hand-written, no framework, no build step, nothing loaded from elsewhere.
// It calls the /v1 API with the key the user typed (sessionStorage, Authorization header,
// never a URL). It shows what the API answers: owners get exact figures where the API gives
// them, analysts the released (DP) ones.
"use strict";

const KEY = "ppml.apiKey";
const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
let leave = () => {}; // stops the current view's live updates

// --- small DOM helpers --------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  return fill(node, attrs, children);
}
function svg(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG, tag), attrs, children);
}
function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const fmt = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const status = (s) => el("span", { class: `status ${s}` }, s);
const link = (href, text) => el("a", { href }, text);

function show(...nodes) {
  const view = document.getElementById("view");
  view.replaceChildren(...nodes);
}
function report(error) {
  const box = document.getElementById("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

// --- the API ------------------------------------------------------------------------------
class Problem extends Error {
  constructor(status, body) {
    const lines = [`${status} ${body.title || ""}: ${body.detail || ""}`];
    for (const item of body.errors || []) lines.push(`  ${item.field}: ${item.message}`);
    super(lines.join("\n"));
    this.status = status;
    this.body = body;
  }
}

function authorization() {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new Error("Enter an API key first (it stays in this browser tab).");
  return { Authorization: `Bearer ${key}` };
}

async function call(path, { method = "GET", json, form, raw = false, headers = {} } = {}) {
  const init = { method, headers: { ...authorization(), ...headers } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  if (form !== undefined) init.body = form;
  const response = await fetch(path, init);
  if (!response.ok) {
    let body = { title: response.statusText };
    try { body = await response.json(); } catch (_) { /* not a problem document */ }
    throw new Problem(response.status, body);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

async function all(path, limit = 5) {
  // Follows next_page_token for a few pages (the dashboard shows recent objects).
  let items = [], token = null;
  for (let page = 0; page < limit; page++) {
    const sep = path.includes("?") ? "&" : "?";
    const url = token ? `${path}${sep}page_token=${encodeURIComponent(token)}` : path;
    const answer = await call(url);
    items = items.concat(answer.items);
    token = answer.next_page_token;
    if (!token) break;
  }
  return items;
}

// --- server-sent events over fetch (EventSource cannot send the Authorization header) -----
async function follow(jobId, onEvent, signal, after = null) {
  let lastId = after; // resume where the history read left off (null: from the job's state)
  while (!signal.aborted) {
    const headers = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    let response;
    try {
      response = await call(`/v1/jobs/${jobId}/events`, { raw: true, headers });
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof Problem && error.status !== 429) throw error;
      await sleep(2000, signal);
      continue;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
    let buffer = "", ended = false;
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (_) { break; }
      if (chunk.done) break;
      buffer += chunk.value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = parseBlock(block);
        if (!event) continue;
        if (event.id !== null) lastId = event.id;
        onEvent(event.name, JSON.parse(event.data));
        if (event.name === "end") ended = true;
      }
    }
    if (ended) return;
    await sleep(1000, signal); // the stream hit its maximum duration: resume after lastId
  }
}

function parseBlock(block) {
  let name = "message", data = "", id = null;
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // keep-alive comment
    const at = line.indexOf(": ");
    const field = at < 0 ? line : line.slice(0, at), value = at < 0 ? "" : line.slice(at + 2);
    if (field === "event") name = value;
    else if (field === "data") data += value;
    else if (field === "id") id = Number(value);
  }
  return data ? { name, data, id } : null;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// --- charts: inline SVG -------------------------------------------------------------------
function chart({ id, title, series, xLabel, yLabel, yMin = null, yMax = null }) {
  const W = 460, H = 230, L = 52, R = 12, T = 26, B = 38;
  const points = series.flatMap((s) => s.points);
  const node = svg("svg", { id, class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  node.append(svg("text", { x: L, y: 16 }, title));
  if (!points.length) {
    node.append(svg("text", { x: W / 2 - 60, y: H / 2 }, "no points yet"));
    return node;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = yMin ?? Math.min(...ys), y1 = yMax ?? Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + (y0 === 0 ? 1 : Math.abs(y0) * 0.1);
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    node.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: py(y), y2: py(y) }));
    node.append(svg("text", { x: 4, y: py(y) + 4 }, Number(y.toPrecision(3))));
  }
  node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  node.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  node.append(svg("text", { x: L, y: H - B + 14 }, x0), svg("text", { x: W - R - 20, y: H - B + 14 }, x1));
  node.append(svg("text", { x: W / 2 - 20, y: H - 6 }, xLabel));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    node.append(svg("path", { class: `series s${i}`, d, "data-points": s.points.length }));
    for (const p of s.points) node.append(svg("circle", { class: `d${i}`, cx: px(p[0]), cy: py(p[1]), r: 2.5 }));
    node.append(svg("text", { x: W - R - 150, y: T + 4 + 14 * i, class: `d${i}` }, s.name));
  });
  node.append(svg("text", { x: 4, y: T - 12 }, yLabel));
  return node;
}

function gauge(budget) {
  // One bar for the total ε: spent (committed), then reserved (held by queued and running
  // jobs). Remaining is what the admission filter can still grant one job; under RDP
  // composition it is not total − spent − reserved, so it is a figure, not a segment.
  const W = 460, H = 58, total = budget.epsilon_total;
  const part = (x) => Math.max(0, Math.min(1, x / total)) * (W - 2);
  const spentW = part(budget.epsilon_spent);
  const reservedW = Math.min(W - 2 - spentW, part(budget.epsilon_reserved));
  return svg("svg", { id: "budget-gauge", class: "gauge", viewBox: `0 0 ${W} ${H}`, role: "img",
                      "aria-label": "privacy budget" },
    svg("rect", { class: "free", x: 1, y: 4, width: W - 2, height: 26, rx: 4 }),
    svg("rect", { class: "spent", x: 1, y: 4, width: spentW, height: 26, "data-epsilon": budget.epsilon_spent }),
    svg("rect", { class: "reserved", x: 1 + spentW, y: 4, width: reservedW, height: 26,
                  "data-epsilon": budget.epsilon_reserved }),
    svg("text", { x: 2, y: 48 }, `spent ε ${fmt(budget.epsilon_spent)} · reserved ε ${fmt(budget.epsilon_reserved)} · ` +
        `remaining ε ${fmt(budget.epsilon_remaining)} of ${fmt(total)}`));
}

// --- views --------------------------------------------------------------------------------
const routes = [
  [/^#\/datasets\/([\w-]+)$/, datasetView],
  [/^#\/jobs\/([\w-]+)$/, jobView],
  [/^#\/jobs(\?.*)?$/, jobsView],
  [/^#\/quote(\?.*)?$/, quoteView],
  [/^#?\/?(datasets)?$/, datasetsView],
];

async function route() {
  leave();
  leave = () => {};
  report(null);
  if (!sessionStorage.getItem(KEY)) return;
  const hash = location.hash || "#/datasets";
  for (const [pattern, view] of routes) {
    const match = hash.match(pattern);
    if (!match) continue;
    try { await view(...match.slice(1)); } catch (error) { report(error); }
    return;
  }
  show(el("p", {}, "Nothing here."));
}

async function datasetsView() {
  const items = await all("/v1/datasets");
  const rows = items.map((d) => el("tr", {},
    el("td", {}, link(`#/datasets/${d.id}`, d.name)), el("td", {}, status(d.status)),
    el("td", {}, d.privacy_unit), el("td", { class: "num" }, d.privacy_budget ? fmt(d.privacy_budget.epsilon, 2) : "public"),
    el("td", { class: "num" }, d.num_train ?? "—"), el("td", {}, when(d.created_at))));
  show(el("section", {}, el("h2", {}, "Datasets"),
    el("table", { id: "datasets" }, el("tr", {}, ["name", "status", "unit", "budget ε", "train rows", "created"].map((h) => el("th", {}, h))), rows)));
}

async function datasetView(id) {
  const dataset = await call(`/v1/datasets/${id}`);
  const parts = [el("h2", {}, `Dataset ${dataset.name}`),
    el("dl", { class: "figures" },
      el("dt", {}, "id"), el("dd", {}, dataset.id), el("dt", {}, "status"), el("dd", {}, status(dataset.status)),
      el("dt", {}, "task"), el("dd", {}, dataset.task), el("dt", {}, "rows (train / held out)"),
      el("dd", {}, `${dataset.num_train ?? "—"} / ${dataset.num_test ?? "—"}`),
      el("dt", {}, "classes"), el("dd", {}, (dataset.classes || []).join(", ") || "—"),
      el("dt", {}, "privacy unit"), el("dd", {}, dataset.privacy_unit)),
    el("p", {}, link(`#/jobs?dataset=${id}`, "Jobs on this dataset"), " · ", link(`#/quote?dataset=${id}`, "Quote a job"))];
  const sections = [el("section", {}, parts)];
  if (dataset.privacy_budget) {
    const [budget, ledger] = await Promise.all([call(`/v1/datasets/${id}/budget`), all(`/v1/datasets/${id}/ledger?page_size=200`)]);
    sections.push(el("section", {}, el("h2", {}, "Privacy budget"), gauge(budget),
      el("p", { class: "note" }, `δ = ${budget.delta_total} · accounting ${budget.accounting}, admission ${budget.admission}. ` +
        "Spent and reserved compose by RDP; remaining is the largest ε one more job can still get."),
      burnDown(budget, ledger), ledgerTable(ledger)));
  } else {
    sections.push(el("section", {}, el("p", {}, "Public data: no privacy budget.")));
  }
  show(...sections);
}

function burnDown(budget, ledger) {
  // The ledger's commits over time: Σ ε of the commits so far (basic composition, an upper
  // bound; the gauge shows the ledger's own RDP composition, which is tighter).
  const commits = ledger.filter((e) => e.kind === "commit").sort((a, b) => a.seq - b.seq);
  let sum = 0;
  const used = [[0, 0]].concat(commits.map((e, i) => [i + 1, (sum += e.epsilon)]));
  const left = used.map(([x, y]) => [x, Math.max(0, budget.epsilon_total - y)]);
  return el("div", {}, chart({ id: "burndown", title: "Burn-down by commit", xLabel: "commits", yLabel: "ε",
    series: [{ name: "ε left (Σ of commits)", points: left }, { name: "Σ ε committed", points: used }], yMin: 0, yMax: budget.epsilon_total }),
    el("p", { class: "note" }, "Each commit's ε is its own; summing them over-states the spend (the ledger composes by RDP)."));
}

function ledgerTable(ledger) {
  return el("table", { id: "ledger" }, el("tr", {}, ["#", "kind", "job", "ε", "when"].map((h) => el("th", {}, h))),
    ledger.map((e) => el("tr", {}, el("td", { class: "num" }, e.seq), el("td", {}, e.kind),
      el("td", {}, link(`#/jobs/${e.job_id}`, e.job_id)), el("td", { class: "num" }, fmt(e.epsilon)), el("td", {}, when(e.created_at)))));
}

async function jobsView() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const datasets = await all("/v1/datasets");
  const statusSelect = el("select", { id: "filter-status", name: "status" }, el("option", { value: "" }, "any status"),
    ["queued", "running", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s, selected: params.get("status") === s }, s)));
  const datasetSelect = el("select", { id: "filter-dataset", name: "dataset" }, el("option", { value: "" }, "any dataset"),
    datasets.map((d) => el("option", { value: d.id, selected: params.get("dataset") === d.id }, d.name)));
  const apply = () => {
    const q = new URLSearchParams();
    if (statusSelect.value) q.set("status", statusSelect.value);
    if (datasetSelect.value) q.set("dataset", datasetSelect.value);
    location.hash = `#/jobs${q.toString() ? "?" + q : ""}`;
  };
  statusSelect.addEventListener("change", apply);
  datasetSelect.addEventListener("change", apply);
  const table = el("table", { id: "jobs" });
  show(el("section", {}, el("h2", {}, "Jobs"), el("form", { class: "inline" }, statusSelect, datasetSelect), table));
  const query = new URLSearchParams();
  if (params.get("status")) query.set("status", params.get("status"));
  if (params.get("dataset")) query.set("dataset_id", params.get("dataset"));
  const controller = new AbortController();
  leave = () => controller.abort();
  while (!controller.signal.aborted) { // live status: poll while a listed job is unfinished
    const jobs = await all(`/v1/jobs?${query}`, 2);
    table.replaceChildren(el("tr", {}, ["name", "status", "progress", "ε target", "ε spent", "created"].map((h) => el("th", {}, h))),
      ...jobs.map((j) => el("tr", {}, el("td", {}, link(`#/jobs/${j.id}`, j.name)), el("td", {}, status(j.status)),
        el("td", { class: "num" }, `${Math.round(100 * j.progress.fraction)}%`),
        el("td", { class: "num" }, j.privacy ? fmt(j.privacy.target_epsilon, 2) : "—"),
        el("td", { class: "num" }, fmt(j.privacy?.epsilon_spent ?? j.progress.epsilon_spent)), el("td", {}, when(j.created_at)))));
    if (jobs.every((j) => TERMINAL.has(j.status))) return;
    await sleep(2000, controller.signal);
  }
}

async function jobView(id) {
  const controller = new AbortController();
  leave = () => controller.abort();
  let job = await call(`/v1/jobs/${id}`);
  const history = await call(`/v1/jobs/${id}/metrics`);
  for (let page = history; page.next_after !== null; ) { // long jobs: the rest of the reports
    page = await call(`/v1/jobs/${id}/metrics?after=${page.next_after}`);
    history.points.push(...page.points);
    if (page.exact) history.exact = (history.exact || []).concat(page.exact);
  }
  const points = history.points.map((p) => ({ ...p, atMs: Date.parse(p.at) }));
  const head = el("section", { id: "job-head" });
  const curves = el("section", { id: "curves" });
  const outcome = el("section", { id: "outcome" });
  show(head, curves, outcome);
  let released = history.released || [];
  let exact = history.exact; // null for analyst keys: the API sends exact figures to owners
  const render = () => {
    renderHead(head, job, points);
    renderCurves(curves, job, points, released, exact);
  };
  render();
  if (TERMINAL.has(job.status)) return renderOutcome(outcome, job);
  outcome.replaceChildren(el("p", { class: "note" }, "Following the job's event stream…"));
  await follow(id, (name, data) => {
    if (name === "progress") {
      job.progress = data;
      const last = points[points.length - 1];
      if (!last || last.steps !== data.steps || last.epsilon_spent !== data.epsilon_spent) points.push({ ...data, atMs: Date.now() });
    } else if (name === "scores") { // an epoch end or a scored round (owner keys only)
      const known = (exact || []).some((m) => m.epoch === data.epoch && m.round === data.round);
      if (!known) exact = (exact || []).concat([data]);
    } else if (name === "status") {
      job.status = data.status;
    } else if (name === "end") {
      job = data;
    }
    render();
  }, controller.signal, points.length ? points[points.length - 1].seq : null);
  if (controller.signal.aborted) return;
  const final = await call(`/v1/jobs/${id}/metrics`);
  released = final.released || [];
  exact = final.exact;
  render();
  renderOutcome(outcome, job);
}

function renderHead(node, job, points) {
  const last = points[points.length - 1];
  const eta = !TERMINAL.has(job.status) && last?.eta_seconds != null ? `${Math.round(last.eta_seconds)} s left` : "";
  node.replaceChildren(...[el("h2", {}, `Job ${job.name} `, status(job.status)),
    el("p", {}, el("progress", { max: 1, value: job.progress.fraction }), ` ${Math.round(100 * job.progress.fraction)}% · `,
      job.progress.round != null ? `round ${job.progress.round}` : `epoch ${job.progress.epoch}`, ` · ${job.progress.steps} steps `, eta),
    el("dl", { class: "figures" }, el("dt", {}, "id"), el("dd", {}, job.id),
      el("dt", {}, "dataset"), el("dd", {}, link(`#/datasets/${job.dataset_id}`, job.dataset_id)),
      el("dt", {}, "ε spent / target"), el("dd", {}, job.privacy ? `${fmt(job.privacy.epsilon_spent ?? job.progress.epsilon_spent)} / ${fmt(job.privacy.target_epsilon, 2)}` : "non-private"),
      el("dt", {}, "created"), el("dd", {}, when(job.created_at)),
      job.error ? [el("dt", {}, "error"), el("dd", {}, `${job.error.code}: ${job.error.message}`)] : null),
    !TERMINAL.has(job.status) ? el("button", { type: "button", id: "cancel", onclick: () => cancel(job.id) }, "Cancel job") : null].filter(Boolean));
}

function renderCurves(node, job, points, releasedList, exactList) {
  const federated = job.progress.round != null || job.spec?.federated;
  const x = (p) => (federated ? p.round ?? 0 : p.fraction * (job.spec?.training?.epochs || 1));
  const epsPoints = points.filter((p) => p.epsilon_spent != null).map((p) => [Number(x(p).toFixed(3)), p.epsilon_spent]);
  const xLabel = federated ? "round" : "epoch";
  const epochs = job.spec?.training?.epochs ?? 1;
  const at = (m, i) => (federated ? m.round ?? i + 1 : m.epoch ?? epochs);
  const released = releasedList.map((m, i) => [at(m, i), m]);
  const exact = (exactList || []).map((m, i) => [at(m, i), m]);
  const accuracy = [{ name: "released (DP)", points: released.map(([r, m]) => [r, m.test_accuracy]) }];
  const loss = [{ name: "released (DP)", points: released.map(([r, m]) => [r, m.test_loss]) }];
  if (exact.length) { // owner keys only: the API sends exact figures to owners
    accuracy.push({ name: "exact (owner)", points: exact.map(([r, m]) => [r, m.test_accuracy]) });
    loss.push({ name: "exact (owner)", points: exact.map(([r, m]) => [r, m.test_loss]) });
  }
  node.replaceChildren(el("h2", {}, "Curves"), el("div", { class: "grid" },
    chart({ id: "curve-epsilon", title: "ε spent", xLabel, yLabel: "ε", yMin: 0, series: [{ name: "ε spent", points: epsPoints }] }),
    chart({ id: "curve-accuracy", title: "Held-out accuracy", xLabel, yLabel: "accuracy", yMin: 0, yMax: 1, series: accuracy }),
    chart({ id: "curve-loss", title: "Held-out loss", xLabel, yLabel: "loss", yMin: 0, series: loss })),
    el("p", { class: "note" }, exactList ? "Your key is an owner's: exact held-out figures (each epoch end or scored round, live) are shown beside the released ones."
      : "Held-out metrics are released through their mechanism (Gaussian noise on budgeted data) once the job has ended; ε spent is live."));
}

async function renderOutcome(node, job) {
  const parts = [el("h2", {}, "Outcome")];
  if (job.metrics) parts.push(el("p", {}, `test accuracy ${fmt(job.metrics.test_accuracy)} · test loss ${fmt(job.metrics.test_loss)} (${job.metrics.release.mechanism})`));
  if (job.status === "succeeded" && !job.models_deleted_at) {
    const card = await call(`/v1/jobs/${job.id}/model/card`);
    parts.push(el("h3", {}, "Privacy receipt"), el("pre", { id: "receipt" }, JSON.stringify(card.privacy ?? card, null, 2)),
      el("p", {}, el("button", { type: "button", id: "download-safetensors", onclick: () => download(job.id, "safetensors") }, "Download safetensors"), " ",
        el("button", { type: "button", id: "download-onnx", onclick: () => download(job.id, "onnx") }, "Download ONNX")),
      predictForm(job, card));
  }
  node.replaceChildren(...parts);
}

function predictForm(job, card) {
  const features = card.architecture?.num_features ?? card.num_features ?? 0;
  const input = el("textarea", { id: "predict-inputs", rows: 3 }, JSON.stringify([Array(features).fill(0)]));
  const answer = el("pre", { id: "predict-answer" });
  const form = el("form", { class: "stack", id: "predict" }, el("h3", {}, "Predict"),
    el("label", { for: "predict-inputs" }, "inputs (JSON: a list of feature rows)"), input, el("button", { type: "submit" }, "Predict"), answer);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    report(null);
    try {
      const result = await call(`/v1/jobs/${job.id}/predict`, { method: "POST", json: { inputs: JSON.parse(input.value) } });
      answer.textContent = JSON.stringify(result, null, 2);
    } catch (error) { report(error); }
  });
  return form;
}

async function download(jobId, format) {
  try {
    const response = await call(`/v1/jobs/${jobId}/model?format=${format}`, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const a = el("a", { href: url, download: `${jobId}.${format}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) { report(error); }
}

async function cancel(jobId) {
  try { await call(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); } catch (error) { report(error); }
}

async function quoteView() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const datasets = (await all("/v1/datasets")).filter((d) => d.status === "ready");
  const field = (name, label, value, type = "text") => [el("label", { for: `q-${name}` }, label),
    el("input", { id: `q-${name}`, name, value, type, step: type === "number" ? "any" : null })];
  const form = el("form", { class: "stack", id: "quote-form" },
    el("label", { for: "q-dataset" }, "dataset"),
    el("select", { id: "q-dataset", name: "dataset" }, datasets.map((d) => el("option", { value: d.id, selected: params.get("dataset") === d.id }, d.name))),
    field("name", "job name", "dashboard-job"),
    el("label", { for: "q-arch" }, "model"), el("select", { id: "q-arch", name: "arch" }, ["mlp", "logreg", "cnn1d"].map((a) => el("option", { value: a }, a))),
    field("hidden", "hidden sizes (mlp, comma separated)", "64"),
    field("epochs", "epochs", 3, "number"), field("batch", "batch size", 128, "number"),
    field("lr", "learning rate", 0.5, "number"), field("epsilon", "target ε (empty: non-private)", 2, "number"),
    field("delta", "δ", 1e-5, "number"), field("clip", "clipping norm", 1, "number"),
    el("p", {}, el("button", { type: "submit", id: "quote" }, "Quote"), " ", el("button", { type: "button", id: "submit-job" }, "Submit job")));
  const answer = el("div", { id: "quote-answer" });
  show(el("section", {}, el("h2", {}, "Quote and submit a job"), el("div", { class: "grid" }, form, answer)));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    report(null);
    try { renderQuote(answer, await call("/v1/jobs/quote", { method: "POST", json: specOf(form) })); } catch (error) { report(error); }
  });
  form.querySelector("#submit-job").addEventListener("click", async () => {
    report(null);
    try {
      const job = await call("/v1/jobs", { method: "POST", json: specOf(form) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) { report(error); }
  });
}

function specOf(form) {
  const v = (name) => form.elements[name].value.trim();
  const arch = v("arch");
  const model = arch === "mlp" ? { arch, hidden_sizes: v("hidden").split(",").filter(Boolean).map(Number) } : { arch };
  return {
    name: v("name"), dataset_id: v("dataset"), model,
    training: { epochs: Number(v("epochs")), batch_size: Number(v("batch")), learning_rate: Number(v("lr")), seed: 0 },
    privacy: v("epsilon") ? { target_epsilon: Number(v("epsilon")), delta: Number(v("delta")), max_grad_norm: Number(v("clip")) } : null,
    federated: null,
  };
}

function renderQuote(node, quote) {
  node.replaceChildren(el("h3", {}, quote.fits_budget ? "Fits the budget" : "Does not fit the budget"),
    el("dl", { class: "figures" },
      el("dt", {}, "ε of the job"), el("dd", { id: "quote-epsilon" }, fmt(quote.epsilon)),
      el("dt", {}, "δ"), el("dd", {}, quote.delta ?? "—"),
      el("dt", {}, "noise multiplier σ"), el("dd", {}, fmt(quote.noise_multiplier)),
      el("dt", {}, "sampling rate q"), el("dd", {}, fmt(quote.sample_rate, 4)),
      el("dt", {}, "steps"), el("dd", {}, quote.steps),
      el("dt", {}, "ε remaining on the dataset"), el("dd", {}, fmt(quote.epsilon_remaining)),
      el("dt", {}, "largest target ε that fits"), el("dd", { id: "quote-max" }, quote.fits_budget ? "this one fits" : fmt(quote.max_target_epsilon)),
      el("dt", {}, "compute"), el("dd", {}, quote.compute)));
}

// --- the key ------------------------------------------------------------------------------
async function whoAmI() {
  const who = document.getElementById("who");
  if (!sessionStorage.getItem(KEY)) { who.textContent = ""; return; }
  try {
    await call("/v1/api-keys?page_size=1");
    who.textContent = "owner key";
  } catch (error) {
    who.textContent = error.status === 403 ? "analyst key" : error.status === 401 ? "key refused" : "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("api-key").value.trim();
    if (value) sessionStorage.setItem(KEY, value);
    document.getElementById("api-key").value = "";
    whoAmI();
    route();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    whoAmI();
    show(el("p", {}, "Key forgotten. Enter an API key to begin."));
  });
  window.addEventListener("hashchange", route);
  whoAmI();
  route();
});
