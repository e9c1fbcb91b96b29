"""Row-wise AdamW: absent rows untouched; present rows follow AdamW; dense mode is plain AdamW."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import optim
from tests.helpers import tiny_config

CFG = tiny_config(**{"optimizer.weight_decay": 0.1})


def rows_tree(seed=0, n=6):
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)}


def test_absent_rows_are_untouched_bit_for_bit():
  params = rows_tree()
  state = optim.row_adam_init(params)
  index = jnp.array([4, 1, 4, 1, 1])
  rows, inverse = optim.unique_rows(index, 6, size=5)
  np.testing.assert_array_equal(rows, [1, 4, 6, 6, 6])
  np.testing.assert_array_equal(np.asarray(rows)[np.asarray(inverse)], index)
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.ones((5,) + x.shape[1:]) * (step + 1),
                         optim.gather_rows(params, rows))
    new, state = optim.row_adam_update(params, state, rows, grads, 0.1, CFG)
    for k in params:
      for absent in (0, 2, 3, 5):
        np.testing.assert_array_equal(new[k][absent], params[k][absent])
        np.testing.assert_array_equal(state.mu[k][absent], 0.0)
      assert not np.allclose(new[k][1], params[k][1])
    params = new
  np.testing.assert_array_equal(state.count, [0, 3, 0, 0, 3, 0])


def test_present_rows_follow_adamw_with_their_own_step_count():
  params = rows_tree(1, n=2)
  state = optim.row_adam_init(params)
  tx = optax.adamw(0.05, b1=CFG.optimizer.b1, b2=CFG.optimizer.b2, eps=CFG.optimizer.eps,
                   weight_decay=0.1, mask={"kernel": True, "bias": False})
  reference = jax.tree.map(lambda x: x[1], params)
  ref_state = tx.init(reference)
  rng = np.random.default_rng(2)
  # Row 1 is updated on steps 0, 2, 3; row 0 only on step 1. Row 1 must match AdamW run on
  # its own three gradients (its own count for bias correction).
  for step, present in enumerate([[1], [0], [1], [1]]):
    rows = jnp.array(present + [2])
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(2,) + x.shape[1:]), jnp.float32),
                         params)
    params, state = optim.row_adam_update(params, state, rows, grads, 0.05, CFG)
    if present == [1]:
      updates, ref_state = tx.update(jax.tree.map(lambda g: g[0], grads), ref_state, reference)
      reference = optax.apply_updates(reference, updates)
  for k in params:
    np.testing.assert_allclose(params[k][1], reference[k], rtol=1e-5, atol=1e-6)


# --- Weight decay by parameter role (issue 13) ---------------------------------------------
# Every parameter leaf of the real model, with whether AdamW decays it. `nn.scan` gives the
# encoder's layer parameters a leading layers axis and the task rows a leading task/slot axis,
# so biases and LayerNorm parameters have rank >= 2 there: rank must not decide.
EXPECTED_DECAY = {
    "encoder/word_embeddings/embedding": True,
    "encoder/position_embeddings/embedding": True,
    "encoder/token_type_embeddings/embedding": True,
    "encoder/image_slot_embeddings/embedding": True,
    "encoder/image_projection/kernel": True,
    "encoder/image_projection/bias": False,
    "encoder/embeddings_norm/scale": False,
    "encoder/embeddings_norm/bias": False,
    "encoder/layers/query/kernel": True,
    "encoder/layers/query/bias": False,
    "encoder/layers/key/kernel": True,
    "encoder/layers/key/bias": False,
    "encoder/layers/value/kernel": True,
    "encoder/layers/value/bias": False,
    "encoder/layers/out/kernel": True,
    "encoder/layers/out/bias": False,
    "encoder/layers/attention_norm/scale": False,
    "encoder/layers/attention_norm/bias": False,
    "encoder/layers/mlp_in/kernel": True,
    "encoder/layers/mlp_in/bias": False,
    "encoder/layers/mlp_out/kernel": True,
    "encoder/layers/mlp_out/bias": False,
    "encoder/layers/output_norm/scale": False,
    "encoder/layers/output_norm/bias": False,
    "encoder/pooler/kernel": True,
    "encoder/pooler/bias": False,
    "tasks/heads/kernel": True,
    "tasks/heads/bias": False,
    "tasks/adapters/down": True,
    "tasks/adapters/down_bias": False,
    "tasks/adapters/up": True,
    "tasks/adapters/up_bias": False,
}
LR, WD = 0.1, 0.1
DECAY_CFG = tiny_config(**{"optimizer.weight_decay": WD})


def model_params(num_layers=2, seed=0):
  """{"encoder": real Encoder params, "tasks": real task params}, every leaf filled with
  nonzero random values (zero-initialised biases would hide a decay)."""
  import flax.linen as nn
  from mtl_jax import task_layers, state
  from mtl_jax.model import Encoder, ModelSpec
  model = DECAY_CFG.model
  spec = ModelSpec(vocab_size=50, max_positions=8, image_dim=4, max_images=2,
                   hidden_size=model.hidden_size, num_layers=num_layers,
                   num_heads=model.num_heads, mlp_size=model.mlp_size)
  encoder = nn.meta.unbox(Encoder(spec).init(jax.random.key(seed), state.dummy_batch(spec))
                          ["params"])
  layout = task_layers.HeadLayout.for_classes([3] * 6, model.classes_per_block, model.max_classes)
  tasks = task_layers.init_task_params(jax.random.key(seed + 1), layout, 3, spec.hidden_size,
                                       model.adapter_size, 2)
  params = {"encoder": encoder, "tasks": tasks}
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) + 0.5, jnp.float32)
                                      for x in leaves])


def path_name(path):
  return "/".join(str(k.key) for k in path)


def test_decay_rule_covers_every_parameter_leaf_by_name():
  params = model_params()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {path_name(path) for path, _ in leaves}
  assert names == set(EXPECTED_DECAY), names ^ set(EXPECTED_DECAY)
  # The scanned layer parameters carry the layers axis: rank >= 2 even for biases/LayerNorm.
  assert params["encoder"]["layers"]["attention_norm"]["scale"].ndim == 2
  assert params["tasks"]["adapters"]["down_bias"].ndim == 3
  got = {path_name(path): optim.decays(path) for path, _ in leaves}
  assert got == EXPECTED_DECAY
  # The rule looks at the leaf's own name, wherever the tree is rooted.
  for path, _ in leaves:
    assert optim.decays(path[-1:]) == EXPECTED_DECAY[path_name(path)]


def test_unknown_leaf_name_is_not_silently_decayed():
  with pytest.raises(ValueError, match="mystery"):
    optim.decays((jax.tree_util.DictKey("mystery"),))


def test_encoder_update_decays_matrices_and_embeddings_only():
  encoder = model_params()["encoder"]
  tx = optim.encoder_optimizer(DECAY_CFG, LR)
  zeros = jax.tree.map(jnp.zeros_like, encoder)
  updates, _ = tx.update(zeros, tx.init(encoder), encoder)
  new = optax.apply_updates(encoder, updates)
  for path, before in jax.tree_util.tree_flatten_with_path(encoder)[0]:
    name = "encoder/" + path_name(path)
    after = new
    for k in path:
      after = after[k.key]
    if EXPECTED_DECAY[name]:
      np.testing.assert_allclose(after, before * (1 - LR * WD), rtol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)


def test_row_update_decays_adapter_and_head_matrices_only():
  tasks = model_params()["tasks"]
  for kind, decayed, kept in (("adapters", ("down", "up"), ("down_bias", "up_bias")),
                              ("heads", ("kernel",), ("bias",))):
    params = tasks[kind]
    rows = jnp.array([1, 2, params["down" if kind == "adapters" else "kernel"].shape[0]])
    grads = jax.tree.map(jnp.zeros_like, optim.gather_rows(params, rows))
    new, _ = optim.row_adam_update(params, optim.row_adam_init(params), rows, grads, LR,
                                   DECAY_CFG)
    for k in decayed:
      np.testing.assert_allclose(new[k][1:3], params[k][1:3] * (1 - LR * WD), rtol=1e-6,
                                 err_msg=k)
      np.testing.assert_array_equal(new[k][0], params[k][0], err_msg=k)  # Absent row.
    for k in kept:
      np.testing.assert_array_equal(new[k], params[k], err_msg=k)


def test_encoder_lr_factor_scales_the_encoder_step():
  """optimizer.encoder_lr_factor multiplies the encoder's AdamW step (linear in the rate, weight
  decay included); 0 freezes the encoder."""
  params = rows_tree(3)
  grads = rows_tree(4)
  schedule = optax.constant_schedule(0.01)
  step = {}
  for factor in (1.0, 0.25, 0.0):
    tx = optim.encoder_optimizer(tiny_config(**{"optimizer.encoder_lr_factor": factor,
                                                "optimizer.weight_decay": 0.1}), schedule)
    step[factor], _ = tx.update(grads, tx.init(params), params)
  for k in params:
    assert np.abs(step[1.0][k]).min() > 1e-3
    np.testing.assert_allclose(step[0.25][k], 0.25 * step[1.0][k], rtol=1e-6)
    np.testing.assert_array_equal(step[0.0][k], 0.0)
