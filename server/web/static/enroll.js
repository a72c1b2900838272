"use strict";
(function () {
  const form = document.getElementById("enroll-form");
  const video = document.getElementById("camera");
  const startButton = document.getElementById("camera-start");
  const captureButton = document.getElementById("capture");
  const cameraStatus = document.getElementById("camera-status");
  const capturesBox = document.getElementById("captures");
  const statusBox = document.getElementById("enroll-status");
  const results = document.getElementById("results");
  const submit = document.getElementById("submit");
  const captures = [];
  const JPEG_QUALITY = 0.92;

  startButton.addEventListener("click", async () => {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      cameraStatus.textContent = "This browser offers no camera here (HTTPS or localhost is required). Use file upload.";
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false });
      video.srcObject = stream;
      captureButton.disabled = false;
      cameraStatus.textContent = "Camera live: face the camera, eyes open, then Capture.";
    } catch (err) {
      cameraStatus.textContent = "Camera unavailable: " + err.name;
    }
  });

  captureButton.addEventListener("click", () => {
    if (!video.videoWidth) {
      cameraStatus.textContent = "No frame yet; wait for the live picture.";
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      if (!blob) {
        return;
      }
      const index = captures.length + 1;
      captures.push(new File([blob], "capture-" + index + ".jpg", { type: "image/jpeg" }));
      const thumb = facegate.el("img", { src: URL.createObjectURL(blob), alt: "capture " + index, class: "thumb" });
      capturesBox.appendChild(thumb);
      cameraStatus.textContent = captures.length + " capture(s) ready.";
    }, "image/jpeg", JPEG_QUALITY);
  });

  function fmt(value) {
    return value === null || value === undefined ? "?" : Number(value).toFixed(2);
  }

  function renderResults(body) {
    results.replaceChildren();
    for (const r of body.results || []) {
      const label = (r.filename || "image " + (r.index + 1)) + ": " + r.status;
      const item = facegate.el("li", { class: "result " + r.status, "data-status": r.status }, [facegate.el("strong", { text: label })]);
      if (r.error && r.status !== "rejected") {
        item.appendChild(facegate.el("div", { class: "reason", text: r.error }));
      }
      for (const f of r.failures || []) {
        item.appendChild(facegate.el("div", { class: "reason gate", "data-gate": f.gate,
          text: f.gate + ": " + f.message + " (measured " + fmt(f.measured) + ", limit " + fmt(f.limit) + ")" }));
      }
      if (r.flagged) {
        item.appendChild(facegate.el("div", { class: "reason warn",
          text: "flagged: far from this person's other templates (mean cosine " + fmt(r.consistency) + "); check it is the right photo" }));
      }
      if (r.duplicate && r.status === "accepted") {
        item.appendChild(facegate.el("div", { class: "reason warn",
          text: "duplicate check overridden: matched " + r.duplicate.name + " at " + fmt(r.duplicate.score) }));
      }
      results.appendChild(item);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = Array.from(document.getElementById("files").files || []);
    const images = files.concat(captures);
    if (!images.length) {
      statusBox.textContent = "Add at least one image: capture from the camera or choose files.";
      return;
    }
    const data = new FormData();
    data.append("name", document.getElementById("name").value);
    data.append("external_id", document.getElementById("external-id").value);
    data.append("consent", document.getElementById("consent").checked ? "true" : "false");
    data.append("override_duplicate", document.getElementById("override").checked ? "true" : "false");
    data.append("source", files.length ? "upload" : "webcam");
    for (const image of images) {
      data.append("images", image, image.name);
    }
    submit.disabled = true;
    statusBox.textContent = "Checking " + images.length + " image(s)…";
    try {
      const res = await facegate.api("/api/enroll", { method: "POST", body: data });
      const body = res.body || {};
      if (res.ok && body.person) {
        statusBox.textContent = "Enrolled " + body.person.name + ": " + body.accepted + " accepted, " + body.rejected + " rejected.";
        statusBox.className = "status ok";
        captures.length = 0;
        capturesBox.replaceChildren();
      } else {
        statusBox.textContent = "Not enrolled: " + (body.results ? "no image passed the checks." : facegate.errorText(body, res.status));
        statusBox.className = "status error";
      }
      renderResults(body);
    } finally {
      submit.disabled = false;
    }
  });
})();
