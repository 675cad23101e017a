// naiad operator console: polls the scheduler's JSON API and renders it.
//
// Everything shown comes from the network (peer ids and labels are chosen by peers), so the page
// never builds HTML from strings: every value goes through textContent or setAttribute, which
// the browser escapes. No framework, no build step, no external resources.
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const API = "/api/v1";

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) {
    const node = $(id);
    if (node) node.textContent = String(value);
  }

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function bytes(n) {
    n = Number(n) || 0;
    let i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + UNITS[i];
  }

  function percent(ratio) {
    return (Number(ratio) * 100).toFixed(1) + "%";
  }

  function shortId(id) {
    const s = String(id);
    const colon = s.indexOf(":");
    if (s.length <= 32 || colon < 0) return s;
    return s.slice(0, colon + 13) + "…" + s.slice(-6);
  }

  function age(seconds) {
    const s = Number(seconds) || 0;
    return s < 60 ? s.toFixed(1) + " s ago" : Math.round(s / 60) + " min ago";
  }

  function badge(text, kind) {
    return el("span", { class: "badge " + kind }, text);
  }

  function replaceRows(tbody, rows, emptyText, columns) {
    if (rows.length === 0) {
      rows = [el("tr", { class: "empty" }, el("td", { colspan: columns }, emptyText))];
    }
    tbody.replaceChildren(...rows);
  }

  function renderStats(stats) {
    const b = stats.bytes || {};
    const served = Number(stats.served_bytes) || 0;
    const saving = $("savings-ratio");
    saving.textContent = percent(stats.savings_ratio);
    saving.setAttribute("data-value", String(stats.savings_ratio));
    saving.classList.toggle("idle", served === 0);
    setText("savings-note", served === 0
      ? "nothing served to clients yet"
      : bytes(b.origin) + " from the origin for " + bytes(served) + " served");
    setText("served-bytes", bytes(served));
    setText("uploaded-bytes", bytes(stats.uploaded_bytes));
    setText("peer-count", stats.peers);
    setText("task-count", stats.tasks);
    setText("back-to-source", stats.back_to_source);

    const total = ["origin", "peer", "local"].reduce((sum, k) => sum + (Number(b[k]) || 0), 0);
    for (const k of ["origin", "peer", "local"]) {
      const n = Number(b[k]) || 0;
      setText("bytes-" + k, bytes(n) + (total ? " · " + percent(n / total) : ""));
      $("bar-" + k).style.width = (total ? (100 * n) / total : 0) + "%";
    }
    $("source-bar").classList.toggle("idle", total === 0);
  }

  function peerState(p) {
    const out = [];
    if (p.cordoned) out.push(badge("cordoned", "warn"));
    if (p.penalised) {
      out.push(badge("penalised" + (p.penalty_reason ? ": " + p.penalty_reason : ""), "bad"));
    }
    if (out.length === 0) out.push(badge("ok", "good"));
    return out;
  }

  function renderPeers(peers) {
    peers = [...peers].sort((a, b) => String(a.id).localeCompare(String(b.id)));
    const rows = peers.map((p) => {
      const load = p.load || {};
      const counters = p.counters || {};
      return el("tr", { "data-peer-id": p.id },
        el("td", { class: "id" }, p.id),
        el("td", { class: "mono" }, p.upload_addr || ""),
        el("td", {}, p.idc || "–"),
        el("td", {}, p.location || "–"),
        el("td", {}, p.seed ? badge("seed", "seed") : "peer"),
        el("td", { class: "num" }, (load.active_uploads ?? 0) + " / " + (p.upload_slots ?? "?")),
        el("td", { class: "num" }, p.tasks ?? 0),
        el("td", { class: "num" }, bytes(counters.served)),
        el("td", { class: "num" }, age(p.last_heartbeat_age)),
        el("td", {}, ...peerState(p)));
    });
    replaceRows($("peers"), rows, "no live peers", 10);
    setText("seed-count", peers.filter((p) => p.seed).length);
    setText("cordoned-count", peers.filter((p) => p.cordoned).length);
  }

  function renderTasks(tasks) {
    tasks = [...tasks].sort((a, b) => String(a.task_id).localeCompare(String(b.task_id)));
    const rows = tasks.map((t) => {
      const count = Number(t.pieces) || 0;
      const known = Number(t.pieces_known) || 0;
      const meter = el("span", { class: "meter" }, el("span", { class: "fill" }));
      meter.firstChild.style.width = (count ? (100 * known) / count : 0) + "%";
      return el("tr", { "data-task-id": t.task_id },
        el("td", { class: "id mono", title: t.task_id }, shortId(t.task_id)),
        el("td", { class: "num" }, bytes(t.length)),
        el("td", { class: "num" }, bytes(t.piece_size)),
        el("td", { class: "pieces" }, meter, known + " / " + count),
        el("td", { class: "num" }, t.holders ?? 0),
        el("td", { class: "num" }, t.complete_holders ?? 0),
        el("td", {}, t.sealed ? badge("sealed", "good") : badge("provisional", "warn")));
    });
    replaceRows($("tasks"), rows, "no tasks yet", 7);
  }

  async function getJSON(path) {
    const r = await fetch(API + path, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  async function refresh() {
    try {
      const [stats, peers, tasks] = await Promise.all(
        [getJSON("/stats"), getJSON("/peers"), getJSON("/tasks")]);
      renderStats(stats);
      renderPeers(peers.peers || []);
      renderTasks(tasks.tasks || []);
      const status = $("status");
      status.textContent = "updated " + new Date().toLocaleTimeString();
      status.classList.remove("error");
    } catch (e) {
      const status = $("status");
      status.textContent = "scheduler unreachable (" + (e && e.message ? e.message : e) +
        "), retrying";
      status.classList.add("error");
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
