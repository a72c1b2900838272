"""The one MQTT client construction and TLS setup (``core.mqtt.client``)."""
