"use strict";
(function () {
  const REFRESH_MS = 2000;
  const table = document.querySelector("#events-table tbody");
  const auto = document.getElementById("auto-refresh");
  const refreshed = document.getElementById("refreshed");
  const params = new URLSearchParams(window.location.search);
  const query = new URLSearchParams();
  for (const key of ["person_id", "device_id", "kind"]) {
    if (params.get(key)) {
      query.set(key, params.get(key));
    }
  }
  document.getElementById("csv-link").href = "/api/events.csv" + (query.toString() ? "?" + query : "");
  query.set("limit", "100");

  function row(e) {
    const cells = [
      facegate.el("td", {}, [facegate.el("time", { dateTime: e.ts, text: facegate.time(e.ts) })]),
      facegate.el("td", { text: e.device_id }),
      facegate.el("td", {}, [facegate.el("span", { class: "badge " + e.kind, text: e.kind })]),
      facegate.el("td", { text: e.person_name || e.person_id || "" }),
      facegate.el("td", { text: e.score === null ? "" : e.score.toFixed(3) }),
      facegate.el("td", { text: e.liveness || "" }),
      facegate.el("td", { text: e.detail || "" }),
      facegate.el("td", { class: "mono", text: e.event_id }),
    ];
    return facegate.el("tr", { "data-event-id": e.event_id }, cells);
  }

  // Decisions per hour per door: small stacked bar charts drawn as inline SVG (no chart library).
  const CHART_REFRESH_MS = 15000;
  const KIND_COLOURS = {
    granted: "#1a7f37", denied: "#cf222e", unknown: "#bf8700", spoof: "#8250df",
    manual_unlock: "#1f6feb", door_fault: "#57606a",
  };
  const SVG = "http://www.w3.org/2000/svg";
  const BAR_W = 12;
  const GAP = 2;
  const PLOT_H = 70;
  const AXIS_H = 16;
  const LEFT = 28;
  const chart = document.getElementById("events-chart");
  const legend = document.getElementById("chart-legend");

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) {
      node.setAttribute(key, String(value));
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function doorChart(door, hours) {
    const kinds = Object.keys(KIND_COLOURS).filter((k) => door.counts[k]);
    const totals = hours.map((_, i) => kinds.reduce((sum, k) => sum + door.counts[k][i], 0));
    const top = Math.max(1, ...totals);
    const width = LEFT + hours.length * (BAR_W + GAP);
    const root = svg("svg", { width: width, height: PLOT_H + AXIS_H, role: "img", class: "hourly",
      "data-device-id": door.device_id, "aria-label": "Decisions per hour at " + door.device_id });
    root.appendChild(svg("text", { x: LEFT - 4, y: 10, "text-anchor": "end", "font-size": 10 }, String(top)));
    root.appendChild(svg("text", { x: LEFT - 4, y: PLOT_H, "text-anchor": "end", "font-size": 10 }, "0"));
    root.appendChild(svg("line", { x1: LEFT, y1: PLOT_H + 0.5, x2: width, y2: PLOT_H + 0.5, stroke: "#8c959f" }));
    hours.forEach((hour, i) => {
      const x = LEFT + i * (BAR_W + GAP);
      const label = facegate.time(hour).slice(11, 16);
      const bar = svg("g", { class: "bar", "data-hour": hour, "data-total": totals[i] });
      const parts = kinds.filter((k) => door.counts[k][i]).map((k) => k + " " + door.counts[k][i]);
      bar.appendChild(svg("title", {}, door.device_id + " " + label + " UTC: " + (parts.join(", ") || "none")));
      let y = PLOT_H;
      for (const kind of kinds) {
        const n = door.counts[kind][i];
        if (n) {
          const h = (PLOT_H - 12) * n / top;
          y -= h;
          bar.appendChild(svg("rect", { x: x, y: y, width: BAR_W, height: h, fill: KIND_COLOURS[kind], "data-kind": kind, "data-count": n }));
        }
      }
      root.appendChild(bar);
      if (i % 6 === 0) {
        root.appendChild(svg("text", { x: x, y: PLOT_H + AXIS_H - 3, "font-size": 10 }, label));
      }
    });
    return facegate.el("figure", {}, [facegate.el("figcaption", { text: door.device_id }), root]);
  }

  function drawLegend() {
    legend.replaceChildren(...Object.entries(KIND_COLOURS).map(([kind, colour]) => {
      const swatch = facegate.el("span", { class: "swatch" });
      swatch.style.background = colour;
      return facegate.el("span", {}, [swatch, kind]);
    }));
  }

  async function refreshChart() {
    if (!document.hidden) {
      const chartQuery = new URLSearchParams({ hours: "24" });
      if (params.get("device_id")) {
        chartQuery.set("device_id", params.get("device_id"));
      }
      const res = await facegate.api("/api/events/hourly?" + chartQuery.toString());
      if (res.ok) {
        const doors = res.body.devices.map((d) => doorChart(d, res.body.hours));
        chart.replaceChildren(...(doors.length ? doors : [facegate.el("span", { class: "hint", text: "No decisions in the last 24 hours." })]));
      }
    }
    window.setTimeout(refreshChart, CHART_REFRESH_MS);
  }
  drawLegend();
  refreshChart();

  async function refresh() {
    if (auto.checked && !document.hidden) {
      const res = await facegate.api("/api/events?" + query.toString());
      if (res.ok) {
        table.replaceChildren(...res.body.items.map(row));
        refreshed.textContent = "updated " + new Date().toLocaleTimeString() + " · " + res.body.total + " events";
      }
    }
    window.setTimeout(refresh, REFRESH_MS);
  }
  window.setTimeout(refresh, REFRESH_MS);
})();
