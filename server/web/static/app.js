"use strict";
// Shared helpers of the enrollment station. Server data is always inserted with textContent, never HTML.
window.facegate = {
  async api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: { Accept: "application/json" } }, options || {});
    const res = await fetch(path, opts);
    let body = null;
    const type = res.headers.get("content-type") || "";
    if (type.includes("application/json")) {
      body = await res.json();
    }
    if (res.status === 401) {
      window.location.assign("/login");
    }
    return { status: res.status, ok: res.ok, body: body };
  },

  el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") {
        node.textContent = value;
      } else if (key === "class") {
        node.className = value;
      } else if (key.startsWith("data-")) {
        node.setAttribute(key, value);
      } else {
        node[key] = value;
      }
    }
    for (const child of children || []) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  },

  errorText(body, status) {
    if (body && typeof body.detail === "string") {
      return body.detail;
    }
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((d) => (d.loc || []).join(".") + ": " + d.msg).join("; ");
    }
    return "request failed with HTTP " + status;
  },

  time(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "").replace("Z", "") : "";
  },
};
