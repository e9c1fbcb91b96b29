"""mtl_jax: one multi-modal transformer trained on many classification tasks at once."""
