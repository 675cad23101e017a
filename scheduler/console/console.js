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

  // -- charts: SVG drawn here, no library. Every drawn series carries what it draws
  // (data-series, data-t, data-values; a holder row its data-runs), so scripts and tests read
  // the picture's numbers from the picture itself.

  const SOURCES = ["origin", "peer", "local"];
  const GRID_ROWS = 32; // holders drawn at most; the note says how many more there are

  function svg(parent, tag, attrs, text) {
    // Created in the namespace of the page's own <svg> elements.
    const node = document.createElementNS(parent.namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = String(text);
    parent.append(node);
    return node;
  }

  function size(node) {
    const [, , w, h] = node.getAttribute("viewBox").split(" ").map(Number);
    return { w, h };
  }

  const coord = (x) => String(Math.round(x * 10) / 10);
  const trim = (x) => String(Number(x.toPrecision(6)));

  function niceStep(span, count) {
    const raw = span / count;
    const p = 10 ** Math.floor(Math.log10(raw));
    const f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit",
      second: "2-digit" });
  }

  function duration(seconds) {
    const s = Math.round(seconds);
    return s < 120 ? s + " s" : Math.round(s / 60) + " min";
  }

  // Lines over time: `series` is [{name, values}], values[i] at t[i] (null: no point, the line
  // breaks), on a y axis from yMin to yMax with `ticks` ([{value, label}]).
  function lineChart(node, t, series, yMin, yMax, ticks, emptyText) {
    const { w, h } = size(node);
    const m = { left: 70, right: 14, top: 10, bottom: 24 };
    const pw = w - m.left - m.right;
    const ph = h - m.top - m.bottom;
    node.replaceChildren();
    if (t.length < 2) {
      svg(node, "text", { x: w / 2, y: h / 2, class: "empty", "text-anchor": "middle" }, emptyText);
      return;
    }
    const t0 = t[0];
    const t1 = t[t.length - 1];
    const x = (ti) => m.left + (pw * (ti - t0)) / (t1 - t0);
    const y = (v) => m.top + ph * (1 - (v - yMin) / (yMax - yMin));
    const axis = svg(node, "g", { class: "axis" });
    for (const tick of ticks) {
      const yy = coord(y(tick.value));
      svg(axis, "line", { x1: m.left, x2: w - m.right, y1: yy, y2: yy, class: "gridline" });
      svg(axis, "text", { x: m.left - 6, y: coord(y(tick.value) + 4), "text-anchor": "end" },
        tick.label);
    }
    const steps = w >= 600 ? 4 : 2;
    for (let i = 0; i <= steps; i += 1) {
      const anchor = i === 0 ? "start" : i === steps ? "end" : "middle";
      const ti = t0 + ((t1 - t0) * i) / steps;
      svg(axis, "text", { x: coord(x(ti)), y: h - 6, "text-anchor": anchor }, clock(ti));
    }
    for (const s of series) {
      const ts = [];
      const vs = [];
      let d = "";
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        const starts = i === 0 || s.values[i - 1] === null || s.values[i - 1] === undefined;
        const ends = i === s.values.length - 1 || s.values[i + 1] === null;
        ts.push(t[i]);
        vs.push(v);
        // A point alone between gaps is a dot (a zero-length line with round caps).
        d += (starts ? "M" : "L") + coord(x(t[i])) + " " + coord(y(v)) + (starts && ends ? "h0" : "") + " ";
      });
      svg(node, "path", { class: "line " + s.name, d: d.trim(), "data-series": s.name,
        "data-t": ts.join(","), "data-values": vs.join(",") });
    }
  }

  function renderHistory(h) {
    const t = h.t || [];
    const rates = h.rates || {};
    let max = 0;
    for (const k of SOURCES) {
      for (const v of rates[k] || []) if (v !== null && v > max) max = v;
    }
    let unit = 0;
    while (max / 1024 ** unit >= 1024 && unit < UNITS.length - 1) unit += 1;
    const scale = 1024 ** unit;
    const step = max > 0 ? niceStep(max / scale, 4) : 1;
    const top = max > 0 ? Math.ceil(max / scale / step) * step : 1;
    const ticks = [];
    for (let i = 0; i * step <= top + step / 2; i += 1) {
      ticks.push({ value: i * step * scale, label: trim(i * step) + " " + UNITS[unit] + "/s" });
    }
    lineChart($("rates-chart"), t, SOURCES.map((k) => ({ name: k, values: rates[k] || [] })),
      0, top * scale, ticks, "collecting samples…");
    for (const k of SOURCES) {
      const last = (rates[k] || [])[t.length - 1];
      setText("rate-" + k, last === null || last === undefined ? "–" : bytes(Math.round(last)) + "/s now");
    }
    const span = t.length >= 2 ? t[t.length - 1] - t[0] : 0;
    setText("history-span", t.length >= 2
      ? "· last " + duration(span) + ", a sample every " + trim(h.interval) + " s" : "");

    const saving = h.saving || [];
    const low = Math.min(0, ...saving.filter((v) => v !== null));
    const sstep = niceStep(1 - low, 4);
    const bottom = Math.floor(low / sstep) * sstep;
    const sticks = [];
    for (let v = bottom; v <= 1 + sstep / 2; v += sstep) {
      sticks.push({ value: v, label: trim(v * 100) + "%" });
    }
    lineChart($("saving-chart"), t, [{ name: "saving", values: saving }], bottom, 1, sticks,
      "collecting samples…");
    setText("saving-history-note", h.saving_ratio === null || h.saving_ratio === undefined
      ? "nothing served to clients in the history yet"
      : percent(h.saving_ratio) + " over the last " + duration(span) + "; each point over the " +
        duration(h.window) + " before it");
  }

  // A task's pieces (columns) by holder (rows); the holders' ids only for a signed caller.
  function renderGrid(task) {
    const node = $("piece-grid");
    const note = $("grid-note");
    node.replaceChildren();
    if (!task) {
      note.textContent = "no task selected: choose one above";
      node.setAttribute("viewBox", "0 0 1200 1");
      return;
    }
    const n = Number(task.pieces) || 0;
    const all = task.grid || [];
    const rows = all.slice(0, GRID_ROWS);
    note.replaceChildren(shortId(task.task_id) + " · " + n + " pieces of " + bytes(task.piece_size) +
      " · " + all.length + " holders ",
      task.sealed ? badge("sealed", "good") : badge("provisional", "warn"),
      all.length > rows.length ? " · " + (all.length - rows.length) + " more not drawn" : "");
    node.setAttribute("data-task", task.task_id);
    node.setAttribute("data-sealed", String(Boolean(task.sealed)));
    const w = 1200;
    const m = { left: 180, right: 80, top: 24, row: 18, bar: 13 };
    const h = m.top + Math.max(1, rows.length) * m.row + 4;
    node.setAttribute("viewBox", "0 0 " + w + " " + h);
    const pw = w - m.left - m.right;
    const cw = n ? pw / n : pw;
    const axis = svg(node, "g", { class: "axis" });
    const marks = Math.min(n, 8);
    const shown = new Set();
    for (let i = 0; i < marks; i += 1) {
      const index = marks === 1 ? 0 : Math.round((i * (n - 1)) / (marks - 1));
      if (shown.has(index)) continue;
      shown.add(index);
      svg(axis, "text", { x: coord(m.left + (index + 0.5) * cw), y: m.top - 8,
        "text-anchor": "middle" }, index);
    }
    if (rows.length === 0) {
      svg(node, "text", { x: w / 2, y: m.top + 12, class: "empty", "text-anchor": "middle" },
        "no holder yet");
    }
    rows.forEach((row, r) => {
      const label = row.holder ?? "holder " + (r + 1);
      const runs = row.runs || [];
      const y = m.top + r * m.row;
      const g = svg(node, "g", { class: "holder-row", "data-row": r + 1,
        "data-holder": row.holder ?? undefined, "data-held": row.held,
        "data-runs": runs.map(([a, b]) => a + "-" + b).join(",") });
      svg(g, "title", {}, label + ": " + row.held + " of " + n + " pieces");
      svg(g, "text", { x: m.left - 8, y: y + 11, "text-anchor": "end", class: "label" },
        label.length > 26 ? label.slice(0, 25) + "…" : label);
      svg(g, "rect", { x: m.left, y, width: coord(pw), height: m.bar, class: "track" });
      for (const [a, b] of runs) {
        svg(g, "rect", { x: coord(m.left + a * cw), y, width: coord(Math.max(0.5, (b - a + 1) * cw)),
          height: m.bar, class: "cell " + (task.sealed ? "sealed" : "provisional") });
      }
      svg(g, "text", { x: w - m.right + 8, y: y + 11, class: "count" }, row.held + " / " + n);
    });
    if (n > 1 && n <= 128) { // few pieces: the columns' edges drawn, so each piece shows
      const edges = svg(node, "g", { class: "edges" });
      for (let i = 1; i < n; i += 1) {
        const x = coord(m.left + i * cw);
        svg(edges, "line", { x1: x, x2: x, y1: m.top, y2: h - 4 });
      }
    }
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

  // The task whose grid is drawn: the one in the address (#task=<id>, set by clicking a row),
  // else the first listed.
  function chosenTask(tasks) {
    const hash = location.hash.startsWith("#task=")
      ? decodeURIComponent(location.hash.slice("#task=".length)) : null;
    if (hash !== null && tasks.some((t) => t.task_id === hash)) return hash;
    return tasks.length ? tasks[0].task_id : null;
  }

  function choose(taskId) {
    location.hash = "task=" + encodeURIComponent(taskId); // hashchange redraws
  }

  function sortedTasks(tasks) {
    return [...tasks].sort((a, b) => String(a.task_id).localeCompare(String(b.task_id)));
  }

  function renderTasks(tasks, chosen) {
    const rows = tasks.map((t) => {
      const count = Number(t.pieces) || 0;
      const known = Number(t.pieces_known) || 0;
      const meter = el("span", { class: "meter" }, el("span", { class: "fill" }));
      meter.firstChild.style.width = (count ? (100 * known) / count : 0) + "%";
      const row = el("tr", { "data-task-id": t.task_id, tabindex: 0,
        class: t.task_id === chosen ? "selected" : "choosable",
        "aria-selected": String(t.task_id === chosen) },
        el("td", { class: "id mono", title: t.task_id }, shortId(t.task_id)),
        el("td", { class: "num" }, bytes(t.length)),
        el("td", { class: "num" }, bytes(t.piece_size)),
        el("td", { class: "pieces" }, meter, known + " / " + count),
        el("td", { class: "num" }, t.holders ?? 0),
        el("td", { class: "num" }, t.complete_holders ?? 0),
        el("td", {}, t.sealed ? badge("sealed", "good") : badge("provisional", "warn")));
      row.addEventListener("click", () => choose(t.task_id));
      row.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") choose(t.task_id);
      });
      return row;
    });
    replaceRows($("tasks"), rows, "no tasks yet", 7);
  }

  async function getJSON(path, missing) {
    const r = await fetch(API + path, { cache: "no-store", headers: { Accept: "application/json" } });
    if (r.status === 404 && missing !== undefined) return missing;
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  let timer = null;

  async function refresh() {
    try {
      const [stats, peers, tasks, history] = await Promise.all(
        [getJSON("/stats"), getJSON("/peers"), getJSON("/tasks"), getJSON("/history")]);
      const list = sortedTasks(tasks.tasks || []);
      const chosen = chosenTask(list);
      // A task gone since the list was read draws no grid, and is no error.
      const task = chosen === null ? null
        : await getJSON("/tasks/" + encodeURIComponent(chosen), null);
      renderStats(stats);
      renderHistory(history);
      renderPeers(peers.peers || []);
      renderTasks(list, chosen);
      renderGrid(task);
      const status = $("status");
      status.textContent = "updated " + new Date().toLocaleTimeString();
      status.classList.remove("error");
    } catch (e) {
      const status = $("status");
      status.textContent = "scheduler unreachable (" + (e && e.message ? e.message : e) +
        "), retrying";
      status.classList.add("error");
    } finally {
      clearTimeout(timer); // one refresh loop, whoever started this refresh
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  window.addEventListener("hashchange", refresh);
  refresh();
})();
