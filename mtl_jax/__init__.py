"""mtl_jax: one multi-modal transformer trained on many classification tasks at once."""
import os

# TensorFlow is loaded only by clu's summary writers and TFDS, never for a computation. Unless
# the user says otherwise, keep its start-up lines (oneDNN, CPU features) off every command's
# stderr: both settings are needed, and the oneDNN one changes nothing this package computes.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
