"""The single-stream multi-modal encoder: `[CLS] text [SEP] image_1 ... image_k` -> pooled state.

A BERT-style post-LayerNorm transformer (the layout of BERT-family checkpoints, so pretrained text
weights load onto it). Each image is a fixed-size embedding from a pretrained image encoder,
projected to the hidden size; token-type embeddings mark text (0) and image (1) positions, and a
learned slot embedding orders the images. Padding masks cover text and missing images.

Layers are stacked with `nn.scan` (one compilation however deep; `scan_unroll` layers per
iteration), optionally rematerialised (`remat`), and run in `dtype`: bfloat16 on accelerators,
with float32 parameters, optimiser state and softmax (bf16 has float32's exponent range, so no
loss scaling is needed). Every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv`, `mlp`, `layers`, `image`) that the config's sharding rules map onto the device mesh.
The task heads and adapters live in `task_layers.py`.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# Which activations each layer keeps for the backward pass (`model.remat`); the rest are
# recomputed, trading compute for memory.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Every size the encoder needs: the config's `model` fields plus what the data fixes."""
  vocab_size: int
  max_positions: int
  image_dim: int
  max_images: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_size: int
  dropout: float = 0.1
  pooling: str = "cls"
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1
  layer_norm_eps: float = 1e-12
  type_vocab_size: int = 2

  @classmethod
  def from_config(cls, model_config, **data_sizes) -> "ModelSpec":
    """The spec of a config's `model` fields; `data_sizes` (vocab_size, max_positions,
    image_dim, max_images) are what the data fixes."""
    m = model_config
    return cls(**data_sizes, hidden_size=m.hidden_size, num_layers=m.num_layers,
               num_heads=m.num_heads, mlp_size=m.mlp_size, dropout=m.dropout, pooling=m.pooling,
               dtype=m.dtype, remat=m.remat, scan_unroll=m.scan_unroll)

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)


def _dense(features, axes, spec, name, **kwargs):
  return nn.DenseGeneral(
      features, dtype=spec.compute_dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:] if isinstance(
          features, int) else axes[-len(features):]),
      **kwargs)


def _layer_norm(spec, name):
  return nn.LayerNorm(
      epsilon=spec.layer_norm_eps, dtype=spec.compute_dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _embed(num, spec, axes, name):
  return nn.Embed(
      num, spec.hidden_size, dtype=spec.compute_dtype, param_dtype=jnp.float32, name=name,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


class EncoderLayer(nn.Module):
  """Self-attention and MLP blocks, each followed by residual + LayerNorm (BERT layout)."""
  spec: ModelSpec
  deterministic: bool

  @nn.compact
  def __call__(self, x, mask):
    spec = self.spec
    head_dim = spec.hidden_size // spec.num_heads
    qkv_shape = (spec.num_heads, head_dim)
    q = _dense(qkv_shape, ("embed", "heads", "kv"), spec, "query")(x)
    k = _dense(qkv_shape, ("embed", "heads", "kv"), spec, "key")(x)
    v = _dense(qkv_shape, ("embed", "heads", "kv"), spec, "value")(x)
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    attended = _dense(spec.hidden_size, ("heads", "kv", "embed"), spec, "out", axis=(-2, -1))(
        attended)
    attended = nn.Dropout(spec.dropout)(attended, deterministic=self.deterministic)
    x = _layer_norm(spec, "attention_norm")(x + attended)

    h = _dense(spec.mlp_size, ("embed", "mlp"), spec, "mlp_in")(x)
    h = nn.gelu(h, approximate=False)  # BERT's exact GELU; the tanh form breaks parity.
    h = _dense(spec.hidden_size, ("mlp", "embed"), spec, "mlp_out")(h)
    h = nn.Dropout(spec.dropout)(h, deterministic=self.deterministic)
    x = _layer_norm(spec, "output_norm")(x + h)
    return x, None


class Encoder(nn.Module):
  """batch -> pooled [B, H] (and the final sequence states [B, L + K, H])."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, batch, deterministic: bool = True, mix=None):
    """Encodes a batch. `mix(name, embeddings, mask)`, if given, transforms the text token
    embeddings (name "text") and the projected image embeddings ("image") before the encoder
    layers: the hook through which embedding augmentations run inside the train step."""
    spec = self.spec
    mix = mix or (lambda name, x, mask: x)
    token_ids = batch["token_ids"]
    text_len = token_ids.shape[1]
    if text_len > spec.max_positions:  # nn.Embed would return NaN rows past its table.
      raise ValueError(f"{text_len} text tokens exceed the {spec.max_positions} position "
                       "embeddings; lower config.data.max_text_len.")
    text = _embed(spec.vocab_size, spec, ("vocab", "embed"), "word_embeddings")(token_ids)
    text += _embed(spec.max_positions, spec, (None, "embed"), "position_embeddings")(
        jnp.arange(text_len))[None]
    types = _embed(spec.type_vocab_size, spec, (None, "embed"), "token_type_embeddings")
    text += types(jnp.zeros((1, text_len), jnp.int32))
    text = mix("text", text, batch["token_mask"])

    images = _dense(spec.hidden_size, ("image", "embed"), spec, "image_projection")(
        batch["images"].astype(spec.compute_dtype))
    images += _embed(spec.max_images, spec, (None, "embed"), "image_slot_embeddings")(
        jnp.arange(spec.max_images))[None]
    images += types(jnp.ones((1, spec.max_images), jnp.int32))
    images = mix("image", images, batch["image_mask"])

    x = jnp.concatenate([text, images], axis=1)
    x = _layer_norm(spec, "embeddings_norm")(x)
    x = nn.Dropout(spec.dropout)(x, deterministic=deterministic)
    mask = jnp.concatenate(
        [batch["token_mask"].astype(bool), batch["image_mask"].astype(bool)], axis=1)

    layer = EncoderLayer
    if spec.remat != "none":
      layer = nn.remat(EncoderLayer, prevent_cse=False, policy=REMAT_POLICIES[spec.remat])
    layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast, length=spec.num_layers, unroll=spec.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layers(spec, deterministic, name="layers")(x, mask)

    if spec.pooling == "cls":
      pooled = _dense(spec.hidden_size, ("embed", "mlp"), spec, "pooler")(x[:, 0])
      pooled = jnp.tanh(pooled)
    elif spec.pooling == "mean":
      weights = mask.astype(x.dtype)[..., None]
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    else:
      raise ValueError(f"model.pooling={spec.pooling!r}: use 'cls' or 'mean'.")
    return pooled.astype(jnp.float32), x
