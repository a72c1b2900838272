"""Server side of signed bundles: build, sign, publish in chunks, answer chunk requests, deltas, rollout."""
