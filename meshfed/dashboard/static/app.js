// meshfed dashboard: draws /api/view as SVG and keeps it live over server-sent events (/api/events).
// Written for meshfed, no libraries; every element is built with createElement and textContent.
"use strict";
(function () {
  const SVGNS = "http://www.w3.org/2000/svg";
  const REGION_W = 330, GAP = 360, PAD = 20, TOP = 20;
  let current = null;       // the last view
  let diagnosing = null;    // {service} while the diagnose panel is open

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function num(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
  function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%"; }

  function edgeText(e) {
    if (e.gateway === "down") return `${e.service}  gateway of ${e.destination} down` +
      (e.requests_per_s ? `  ${num(e.requests_per_s, 2)} req/s err ${pct(e.error_ratio)}` : "");
    const rate = e.requests_per_s === null ? "no traffic" : num(e.requests_per_s, 2) + " req/s";
    return `${e.service}  ${rate}  err ${pct(e.error_ratio)}  p99 ${e.p99_ms === null ? "-" : num(e.p99_ms, 1) + " ms"}`;
  }

  function drawTopology(view) {
    const root = document.getElementById("topology");
    clear(root);
    const clusters = view.clusters;
    const xOf = {};
    clusters.forEach((c, i) => { xOf[c.name] = PAD + i * (REGION_W + GAP); });
    const rows = Math.max(...clusters.map(c => c.exports.length + c.imports.length), 0);
    const regionH = 200 + rows * 17;
    const width = PAD * 2 + clusters.length * REGION_W + Math.max(0, clusters.length - 1) * GAP;
    const edgeRows = view.edges.length;
    const height = Math.max(regionH, 90 + edgeRows * 46) + TOP + PAD;
    root.setAttribute("viewBox", `0 0 ${Math.max(width, 400)} ${height}`);
    const defs = svg("defs");
    for (const state of ["ok", "idle", "failing"]) {
      const m = svg("marker", {id: "arrow-" + state, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 5,
                               markerHeight: 5, markerUnits: "strokeWidth", orient: "auto"});
      m.appendChild(svg("path", {d: "M0,0 L10,5 L0,10 z", class: "arrow " + state}));
      defs.appendChild(m);
    }
    root.appendChild(defs);
    for (const c of clusters) root.appendChild(drawRegion(c, xOf[c.name], regionH));
    view.edges.forEach((e, i) => root.appendChild(drawEdge(e, i, xOf)));
  }

  function drawRegion(c, x, h) {
    const g = svg("g", {class: "cluster", "data-cluster": c.name, "data-lease": c.lease.state});
    g.appendChild(svg("rect", {x, y: TOP, width: REGION_W, height: h, rx: 10,
                               class: "region" + (c.lease.state === "held" ? "" : " unreachable")}));
    g.appendChild(svg("text", {x: x + 14, y: TOP + 24, class: "region-title"}, c.name));
    const lease = c.lease.state === "held"
      ? `lease held, renewed ${num(c.lease.age_s, 1)}s ago (ttl ${num(c.lease.ttl_s, 0)}s)`
      : `lease ${c.lease.state}${c.lease.unreachable_since ? " since " + c.lease.unreachable_since : ""}`;
    g.appendChild(svg("text", {x: x + 14, y: TOP + 42, class: "small lease"}, lease));
    g.appendChild(svg("text", {x: x + 14, y: TOP + 57, class: "small"},
                      [c.network, c.locality].filter(Boolean).join("  ")));
    g.appendChild(box("controlplane", c.name, c.controlplane.state, "control plane", x + 14, TOP + 68));
    g.appendChild(box("gateway", c.name, c.gateway.state, "east-west gateway " + (c.gateway.address || ""),
                      x + 14, TOP + 110));
    let y = TOP + 168;
    const list = (title, names, kind) => {
      g.appendChild(svg("text", {x: x + 14, y, class: "small"}, title + (names.length ? "" : ": none")));
      y += 17;
      for (const name of names) {
        const t = svg("text", {x: x + 26, y, class: "service " + kind, "data-service": name, "data-cluster": c.name},
                      (kind === "export" ? "▲ " : "▼ ") + name);
        t.addEventListener("click", () => openDiagnose(name));
        g.appendChild(t);
        y += 17;
      }
    };
    list("exports", c.exports, "export");
    list("imports", c.imports, "import");
    return g;
  }

  function box(role, cluster, state, label, x, y) {
    const g = svg("g", {class: role, "data-cluster": cluster, "data-state": state});
    g.appendChild(svg("rect", {x, y, width: REGION_W - 28, height: 32, rx: 5, class: "box " + state}));
    g.appendChild(svg("text", {x: x + 10, y: y + 20, class: "box-label"}, `${label} — ${state}`));
    return g;
  }

  function drawEdge(e, i, xOf) {
    const g = svg("g", {class: "edge-group", "data-source": e.source, "data-destination": e.destination,
                        "data-service": e.service, "data-state": e.state});
    const sx = xOf[e.source], dx = xOf[e.destination];
    const forward = dx > sx;
    const x1 = forward ? sx + REGION_W : sx, x2 = forward ? dx : dx + REGION_W;
    const y = TOP + 70 + i * 46;
    const adjacent = Math.abs(dx - sx) === REGION_W + GAP;
    const d = adjacent ? `M${x1},${y} L${x2},${y}`
                       : `M${x1},${y} Q${(x1 + x2) / 2},${y - 60} ${x2},${y}`;
    g.appendChild(svg("path", {d, class: "edge " + e.state, "marker-end": `url(#arrow-${e.state})`}));
    const lx = Math.min(x1, x2) + 10;
    g.appendChild(svg("text", {x: lx, y: y - 8, class: "edge-label " + e.state},
                      (forward ? "→ " : "← ") + edgeText(e)));
    const title = svg("title", {}, `${e.source} → ${e.destination} ${e.service}: ${e.state}; p50 ` +
                      `${num(e.p50_ms, 1)} ms; destination gateway ${e.gateway}`);
    g.appendChild(title);
    return g;
  }

  function drawProblems(view) {
    const ul = document.getElementById("problems");
    clear(ul);
    if (!view.problems.length) ul.appendChild(el("li", {class: "none"}, "none"));
    for (const p of view.problems) ul.appendChild(el("li", {class: "problem"}, p));
  }

  function drawTrust(view) {
    const div = document.getElementById("trust");
    clear(div);
    const t = view.trust;
    div.appendChild(el("p", {id: "trust-phase"},
      `trust domain ${t.trust_domain || "-"}; rotation phase: ${t.phase || "-"}` +
      (t.next_step ? `; next: ${t.next_step}` : "")));
    const ul = el("ul", {});
    for (const r of t.roots) {
      ul.appendChild(el("li", {}, `${r.role || "root"} ${String(r.fingerprint).slice(0, 16)} ` +
                                  `not after ${r.not_after} (${r.health})`));
    }
    for (const line of t.rotation || []) ul.appendChild(el("li", {}, line));
    div.appendChild(ul);
    const peers = document.getElementById("peers");
    clear(peers);
    if (!view.peers.length) peers.appendChild(el("li", {class: "none"}, "no peers"));
    for (const p of view.peers) {
      const name = p.name || p.peer || p.trust_domain || JSON.stringify(p);
      const bits = Object.entries(p).filter(([k]) => k !== "name").map(([k, v]) =>
        `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
      peers.appendChild(el("li", {class: "peer"}, `${name}: ${bits.join(", ")}`));
    }
  }

  function drawServices(view) {
    const tbody = document.getElementById("services");
    clear(tbody);
    for (const s of view.services) {
      const tr = el("tr", {"data-service": s.service});
      for (const cell of [s.service, s.type, s.exported_by.join(", ") || "-", s.imported_by.join(", ") || "-",
                          s.problems.join("; ") || "ok"]) tr.appendChild(el("td", {}, cell));
      tr.addEventListener("click", () => openDiagnose(s.service));
      tbody.appendChild(tr);
    }
  }

  function drawHeader(view) {
    const h = document.getElementById("health");
    h.textContent = view.healthy ? "healthy" : `${view.problems.length} problem(s)`;
    h.className = "badge " + (view.healthy ? "ok" : "bad");
    document.getElementById("updated").textContent = "as of " + (view.now || "-");
    const p = view.prometheus || {};
    document.getElementById("prom").textContent = (p.url ? "prometheus " + p.url : "no prometheus") +
      (view.poll ? ` · gathered in ${num(view.poll.last_s, 2)}s` : "");
  }

  function render(view) {
    current = view;
    drawHeader(view);
    drawTopology(view);
    drawProblems(view);
    drawTrust(view);
    drawServices(view);
    document.body.setAttribute("data-rendered", String(Number(document.body.getAttribute("data-rendered") || 0) + 1));
  }

  // ---- diagnose ----
  function callers(service) {
    if (!current) return [];
    const s = current.services.find(x => x.service === service);
    const names = current.clusters.map(c => c.name);
    if (!s) return names;
    const remote = names.filter(n => s.imported_by.includes(n) && !s.exported_by.includes(n));
    return [...remote, ...names.filter(n => !remote.includes(n))];
  }

  function openDiagnose(service) {
    diagnosing = {service};
    const panel = document.getElementById("diagnose");
    panel.hidden = false;
    document.getElementById("diagnose-service").textContent = service;
    const select = document.getElementById("diagnose-from");
    clear(select);
    for (const name of callers(service)) select.appendChild(el("option", {value: name}, name));
    runDiagnose();
  }

  async function runDiagnose() {
    if (!diagnosing) return;
    const from = document.getElementById("diagnose-from").value;
    const summary = document.getElementById("diagnose-summary");
    const tbody = document.getElementById("hops");
    clear(tbody);
    summary.textContent = `diagnosing ${diagnosing.service} from ${from}…`;
    summary.setAttribute("data-state", "running");
    const q = new URLSearchParams({service: diagnosing.service, from});
    let body;
    try {
      const resp = await fetch("/api/diagnose?" + q.toString());
      body = await resp.json();
    } catch (err) {
      body = {error: String(err)};
    }
    if (body.error) {
      summary.textContent = body.error;
      summary.setAttribute("data-state", "error");
      return;
    }
    summary.textContent = body.ok ? `every hop ok (${body.host} from ${body.from})`
      : `first failing hop: ${body.first_failure.hop} ${body.first_failure.name}: ${body.first_failure.detail}`;
    summary.setAttribute("data-state", body.ok ? "ok" : "failing");
    for (const h of body.hops) {
      const failing = h.status === "FAIL";
      const tr = el("tr", {class: "hop " + (failing ? "failing" : h.status), "data-status": h.status,
                           "data-hop": h.name});
      for (const cell of [h.hop, h.name, h.status, h.detail, failing ? h.next_step : ""]) {
        tr.appendChild(el("td", {}, String(cell)));
      }
      tbody.appendChild(tr);
    }
  }

  document.getElementById("diagnose-from").addEventListener("change", runDiagnose);
  document.getElementById("diagnose-run").addEventListener("click", runDiagnose);
  document.getElementById("diagnose-close").addEventListener("click", () => {
    diagnosing = null;
    document.getElementById("diagnose").hidden = true;
  });

  // ---- live updates ----
  function connect() {
    const live = document.getElementById("live");
    const source = new EventSource("/api/events");
    source.addEventListener("view", ev => {
      live.textContent = "live";
      live.className = "badge ok";
      render(JSON.parse(ev.data));
    });
    source.onerror = () => { live.textContent = "reconnecting"; live.className = "badge warn"; };
  }
  fetch("/api/view").then(r => r.json()).then(render).catch(() => {});
  connect();
})();
