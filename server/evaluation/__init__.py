"""Offline evaluation: verification on the pairs protocol, calibration, liveness figures."""
