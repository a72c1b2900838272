"""The MQTT protocol: every topic and payload schema, shared by devices, the server and subscribers."""
