"""The light core both sides import: protocol, MQTT client, files, bundle layout and config bases.

Imports only numpy, pydantic, paho and cryptography: never ``device``, ``server``, ``models.convert``
or TensorFlow (tests/test_import_direction.py checks it).
"""
