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
