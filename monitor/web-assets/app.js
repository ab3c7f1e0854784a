// fedprune dashboard: renders each telemetry snapshot pushed on /events (server-sent events).
// Everything from the network goes into the page as text, never as HTML.
"use strict";

const charts = {};
const $ = (id) => document.getElementById(id);

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function kb(bytes) {
  return bytes === null || bytes === undefined ? "-" : (bytes / 1024).toFixed(0) + " KB";
}

function ago(now, t) {
  const s = Math.max(0, now - t);
  return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

function lineChart(id, datasets, yOptions) {
  const chart = new Chart($(id), {
    type: "line",
    data: { labels: [], datasets: datasets.map((d) => ({ ...d, data: [], tension: 0.2, pointRadius: 2 })) },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      scales: { x: { title: { display: true, text: "round" } }, y: yOptions },
      plugins: { legend: { display: datasets.length > 1 } },
    },
  });
  charts[id] = chart;
  return chart;
}

function setup() {
  lineChart("chart-accuracy", [
    { label: "held-out (coordinator)", borderColor: "#3b6fd8" },
    { label: "devices' own held-out", borderColor: "#d8843b" },
  ], { min: 0, max: 1 });
  lineChart("chart-sparsity", [{ label: "sparsity", borderColor: "#1d7a46" }], { min: 0, max: 1 });
  lineChart("chart-bytes", [
    { label: "sent (KB)", borderColor: "#3b6fd8" },
    { label: "dense float32 (KB)", borderColor: "#9aa3b2", borderDash: [4, 4] },
  ], { beginAtZero: true });
}

function updateChart(id, labels, series) {
  const chart = charts[id];
  chart.data.labels = labels;
  series.forEach((values, i) => { chart.data.datasets[i].data = values; });
  chart.update();
  // The plotted values, readable from the page (tests and curious users).
  chart.canvas.dataset.points = JSON.stringify({ labels, series });
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function renderDevices(snapshot) {
  const now = snapshot.run.updated;
  const body = $("devices").querySelector("tbody");
  body.replaceChildren();
  for (const d of snapshot.devices) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.id;
    cell(tr, d.id);
    cell(tr, d.profile);
    cell(tr, d.trainer);
    cell(tr, String(d.samples), "num");
    cell(tr, d.online ? "online" : "offline", d.online ? "online" : "offline");
    cell(tr, ago(now, d.last_seen));
    cell(tr, String(d.selected), "num");
    cell(tr, String(d.reported), "num");
    cell(tr, String(d.late), "num" + (d.late ? " bad" : ""));
    cell(tr, String(d.rejected), "num" + (d.rejected ? " bad" : ""));
    cell(tr, d.last_reason || "");
    cell(tr, kb(d.bytes_up), "num");
    cell(tr, kb(d.bytes_down), "num");
    cell(tr, fmt(d.train_seconds, 2), "num");
    cell(tr, fmt(d.peak_memory_mb, 0), "num");
    cell(tr, fmt(d.accuracy, 3), "num");
    cell(tr, d.model ? d.model.slice(0, 12) + (d.model_accuracy !== null ? " (" + fmt(d.model_accuracy, 3) + ")" : "") : "-");
    body.appendChild(tr);
  }
  const listed = snapshot.devices.length, total = snapshot.run.devices_total;
  $("device-count").textContent = listed < total ? `(${listed} of ${total} shown)` : `(${total})`;
}

function renderProgress(snapshot) {
  const p = snapshot.progress, box = $("progress");
  box.replaceChildren();
  if (!p) { box.textContent = "no round in progress"; return; }
  const rejected = Object.entries(p.rejected).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
  const line = document.createElement("div");
  line.textContent = `round ${p.round}: ${p.reported.length} of ${p.selected.length} selected devices reported; rejected: ${rejected}; ${kb(p.bytes_up)} received`;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.style.width = (p.selected.length ? (100 * p.reported.length) / p.selected.length : 0) + "%";
  bar.appendChild(fill);
  const waiting = document.createElement("div");
  const missing = p.selected.filter((id) => !p.reported.includes(id));
  waiting.textContent = missing.length ? "waiting for: " + missing.join(", ") : "all selected devices reported";
  box.append(line, bar, waiting);
  const overdue = p.overdue || [];
  if (overdue.length) {
    const lost = document.createElement("div");
    lost.className = "overdue";
    lost.textContent = `overdue: ${overdue.length} update(s) that devices say they sent have not arrived (they resend them): ${overdue.join(", ")}`;
    box.append(lost);
  }
}

function renderEvents(snapshot) {
  const list = $("events");
  list.replaceChildren();
  for (const e of [...snapshot.events].reverse()) {
    const li = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(e.time);
    li.append(time, `${e.kind}${e.device ? " " + e.device : ""}: ${e.text}`);
    list.appendChild(li);
  }
}

function render(snapshot) {
  const run = snapshot.run, rounds = snapshot.rounds;
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  $("run-name").textContent = `${run.name} (session ${run.session})`;
  $("phase").textContent = run.phase;
  $("round").textContent = `${run.round} of ${run.rounds}`;
  $("sparsity").textContent = `${fmt(run.sparsity, 2)} (target ${fmt(run.sparsity_target, 2)})`;
  const auc = last && last.accuracy === null && last.auc !== null && last.auc !== undefined;
  $("metric").textContent = auc ? "AUC" : "accuracy";
  $("accuracy").textContent = last ? fmt(auc ? last.auc : last.accuracy, 3) : "-";
  $("online").textContent = `${snapshot.devices.filter((d) => d.online).length} of ${run.devices_total}`;
  $("deadline").textContent = run.deadline ? clock(run.deadline) : "-";
  $("coordinator").textContent = snapshot.coordinator || "-";
  $("config").textContent = Object.entries(run.config).map(([k, v]) => `${k} ${v}`).join(" · ")
    + (run.signed ? " · signed messages" : " · unsigned");
  const labels = rounds.map((r) => r.round);
  const score = (r) => (r.accuracy === null && r.auc !== undefined ? r.auc : r.accuracy);
  updateChart("chart-accuracy", labels, [rounds.map(score), rounds.map((r) => r.client_accuracy)]);
  updateChart("chart-sparsity", labels, [rounds.map((r) => r.sparsity)]);
  updateChart("chart-bytes", labels, [rounds.map((r) => r.bytes_up / 1024), rounds.map((r) => r.dense_bytes_up / 1024)]);
  renderProgress(snapshot);
  renderDevices(snapshot);
  renderEvents(snapshot);
  document.body.dataset.round = String(run.round);
  document.body.dataset.phase = run.phase;
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { $("connection").textContent = "live"; };
  source.onerror = () => { $("connection").textContent = "reconnecting…"; };
  source.onmessage = (event) => render(JSON.parse(event.data));
}

setup();
// The snapshot the server had when it sent the page: shown at once, before the stream connects.
const first = JSON.parse($("snapshot").textContent);
if (first) render(first);
connect();
