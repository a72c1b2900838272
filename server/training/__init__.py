"""Server-side training: triplet loss and mining, student distillation, pairs head, gate and registry.

Everything here imports TensorFlow/Keras; the device never imports this package.
"""
