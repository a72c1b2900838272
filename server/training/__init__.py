"""Server-side training: triplet loss and mining, student distillation, pairs head, gate and registry.

Most modules here import TensorFlow/Keras; registry, gate, model_folder and promotion stay light (the
server app imports them). The device never imports this package.
"""
