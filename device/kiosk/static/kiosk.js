"use strict";
// The door screen: polls /kiosk/state and shows it; every colour comes with words and a glyph.
(function () {
  const POLL_MS = 250; // the screen follows the door within a quarter second
  const DOWN_AFTER_MS = 3000; // no answer this long: the door agent is not running
  const PREVIEW_RETRY_MS = 2000;
  const GLYPHS = {
    idle: "◉", hint: "⚠", checking: "…", challenge: "↻", granted: "✓", opened: "✓",
    denied: "✗", unknown: "?", spoof: "✗", unavailable: "✗",
  };
  const DOOR_TEXT = { locked: "Door locked", unlocked: "Door open", fault: "Door fault" };
  const body = document.body;
  const message = document.getElementById("message");
  const glyph = document.getElementById("glyph");
  const doorText = document.getElementById("door-text");
  const offline = document.getElementById("offline-badge");
  const liveness = document.getElementById("liveness-badge");
  const challenge = document.getElementById("challenge");
  const countdown = document.getElementById("countdown");
  const bar = document.getElementById("countdown-bar");
  const clock = document.getElementById("clock");
  const preview = document.getElementById("preview");
  let lastOk = Date.now();
  let deadline = null; // performance.now() at which the challenge ends
  let timeoutMs = 1;

  function render(s) {
    body.dataset.state = s.state;
    body.dataset.door = s.door;
    message.textContent = s.message;
    glyph.textContent = GLYPHS[s.state] || "";
    doorText.textContent = DOOR_TEXT[s.door] || "Door " + s.door;
    offline.hidden = s.online !== false;
    liveness.hidden = s.liveness !== "off";
    if (s.challenge) {
      deadline = performance.now() + s.challenge.remaining_s * 1000;
      timeoutMs = Math.max(s.challenge.timeout_s * 1000, 1);
      challenge.hidden = false;
    } else {
      deadline = null;
      challenge.hidden = true;
    }
  }

  function down() {
    body.dataset.state = "unavailable";
    body.dataset.door = "unknown";
    message.textContent = "Out of service: the door stays locked";
    glyph.textContent = GLYPHS.unavailable;
    doorText.textContent = "Door: no signal";
    challenge.hidden = true;
    deadline = null;
    preview.hidden = true; // a frozen picture would look like a live one
  }

  async function poll() {
    try {
      const res = await fetch("/kiosk/state", { cache: "no-store" });
      if (!res.ok) {
        throw new Error("HTTP " + res.status);
      }
      render(await res.json());
      if (Date.now() - lastOk > DOWN_AFTER_MS) {
        reloadPreview(); // back after an outage: a fresh stream
      }
      lastOk = Date.now();
    } catch (err) {
      if (Date.now() - lastOk > DOWN_AFTER_MS) {
        down();
      }
    }
    window.setTimeout(poll, POLL_MS);
  }

  function tick() {
    if (deadline !== null) {
      const left = Math.max(0, deadline - performance.now());
      countdown.textContent = String(Math.ceil(left / 1000));
      bar.style.width = Math.min(100, (100 * left) / timeoutMs).toFixed(1) + "%";
    }
    clock.textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    window.requestAnimationFrame(tick);
  }

  function reloadPreview() {
    preview.hidden = false;
    preview.src = "/kiosk/preview.mjpg?t=" + Date.now();
  }

  preview.addEventListener("error", () => {
    preview.hidden = true; // the preview is off or the agent restarts: try again shortly
    window.setTimeout(reloadPreview, PREVIEW_RETRY_MS);
  });
  // The stream starts after the page loaded: an endless image must not hold the page's load event.
  window.addEventListener("load", reloadPreview);
  poll();
  tick();
})();
