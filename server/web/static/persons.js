"use strict";
(function () {
  const status = document.getElementById("persons-status");
  for (const button of document.querySelectorAll("#persons-table button.delete")) {
    button.addEventListener("click", async () => {
      const name = button.dataset.name;
      if (!window.confirm("Delete " + name + "? Chips and templates are purged and every door is told to forget them.")) {
        return;
      }
      button.disabled = true;
      status.textContent = "Deleting " + name + "…";
      const res = await facegate.api("/api/persons/" + encodeURIComponent(button.dataset.id) + "?wait_s=5", { method: "DELETE" });
      if (!res.ok) {
        status.textContent = "Delete failed: " + facegate.errorText(res.body, res.status);
        button.disabled = false;
        return;
      }
      const d = res.body;
      const confirmed = d.devices.filter((x) => x.state === "confirmed").length;
      status.textContent = d.status === "confirmed"
        ? "Deleted " + name + "; confirmed by " + (d.devices.length ? d.devices.map((x) => x.device_id).join(", ") : "no registered device") + "."
        : "Deleted " + name + " here; " + confirmed + "/" + d.devices.length + " devices confirmed so far (pending).";
      const row = button.closest("tr");
      if (row) {
        row.remove();
      }
    });
  }
})();
