"""The audit log: an MQTT subscriber storing device events exactly once, and the consent/erasure log."""
