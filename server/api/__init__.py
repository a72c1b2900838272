"""HTTP API routers: auth, persons and enrollment, verify/identify, events, devices, rollout, audit."""
