"""The device's MQTT side: the paho wrapper, the event outbox, and the availability/status/command service."""
