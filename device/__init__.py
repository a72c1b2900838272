"""The door kiosk agent: camera -> detect -> align -> liveness -> embed -> gallery -> decide -> door.

Imports only numpy, OpenCV, LiteRT (through ``models.runtime``), FAISS, paho-mqtt and pydantic.
Never TensorFlow, FastAPI, dlib, or anything from ``server``.
"""
