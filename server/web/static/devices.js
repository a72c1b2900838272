"use strict";
(function () {
  const REFRESH_MS = 5000;
  const table = document.querySelector("#devices-table tbody");

  function row(d) {
    const state = d.online ? "online" : d.available;
    return facegate.el("tr", { "data-device-id": d.device_id }, [
      facegate.el("td", { text: d.device_id }),
      facegate.el("td", {}, [facegate.el("span", { class: "badge " + (d.online ? "online" : "offline"), text: state })]),
      facegate.el("td", {}, [facegate.el("time", { dateTime: d.last_seen || "", text: facegate.time(d.last_seen) })]),
      facegate.el("td", { text: d.software_version || "" }),
      facegate.el("td", { class: "mono", text: (d.model_version || "").slice(0, 16) }),
      facegate.el("td", { class: "mono", text: (d.gallery_version || "").slice(0, 16) }),
      facegate.el("td", { text: d.bundle_sequence === null ? "" : String(d.bundle_sequence) }),
      facegate.el("td", { text: d.status.door || "" }),
      facegate.el("td", { text: d.status.outbox_depth === undefined ? "" : String(d.status.outbox_depth) }),
    ]);
  }

  async function refresh() {
    if (!document.hidden) {
      const res = await facegate.api("/api/devices");
      if (res.ok && res.body.length) {
        table.replaceChildren(...res.body.map(row));
      }
    }
    window.setTimeout(refresh, REFRESH_MS);
  }
  window.setTimeout(refresh, REFRESH_MS);
})();
