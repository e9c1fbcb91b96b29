"""The same multi-task model written the usual PyTorch way, for the comparisons.

`transformers.BertModel` of the encoder's sizes fed `inputs_embeds`: the word embeddings of the
text followed by the images through an `nn.Linear` projection, token type 0 for text and 1 for
images, the padding mask of both; its pooler output (CLS, dense, tanh: what our `pooling="cls"`
computes) goes to an `nn.ModuleList` of per-task `nn.Linear` heads, each of its task's width,
applied by a Python loop over the tasks present in the batch. `torch.optim.AdamW` (fused where
this torch has it for the device; its step skips parameters without a gradient, so the heads of
absent tasks are left alone), gradient clipping. Attention-probability dropout is off, as in our
encoder; hidden dropout is the spec's.

Imported only by the scripts that compare against PyTorch (torch is not a dependency of mtl_jax).
"""
import numpy as np
import torch
import transformers
from torch import nn


class TorchMultiTask(nn.Module):
  """Encoder + per-task heads; `forward(batch)` returns the mean cross-entropy."""

  def __init__(self, spec, num_classes):
    super().__init__()
    bert_config = transformers.BertConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        intermediate_size=spec.mlp_size, hidden_act="gelu",
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=0.0,
        max_position_embeddings=spec.max_positions + spec.max_images, type_vocab_size=2,
        layer_norm_eps=spec.layer_norm_eps)
    self.bert = transformers.BertModel(bert_config)
    self.image_projection = nn.Linear(spec.image_dim, spec.hidden_size)
    self.heads = nn.ModuleList(nn.Linear(spec.hidden_size, int(k)) for k in num_classes)

  def encode(self, token_ids, token_mask, images, image_mask):
    """Pooled [B, H]: the part `torch.compile` can take whole (no data-dependent control)."""
    text = self.bert.embeddings.word_embeddings(token_ids)
    projected = self.image_projection(images)
    types = torch.cat([torch.zeros_like(token_ids), torch.ones_like(image_mask)], dim=1)
    mask = torch.cat([token_mask, image_mask], dim=1)
    return self.bert(inputs_embeds=torch.cat([text, projected.to(text.dtype)], dim=1),
                     attention_mask=mask, token_type_ids=types).pooler_output

  def head_loss(self, pooled, task_id, label):
    loss = pooled.new_zeros((), dtype=torch.float32)
    for t in torch.unique(task_id).tolist():  # The tasks present in this batch.
      rows = (task_id == t).nonzero(as_tuple=True)[0]
      loss = loss + nn.functional.cross_entropy(self.heads[t](pooled[rows]).float(), label[rows],
                                                reduction="sum")
    return loss / task_id.shape[0]

  def forward(self, b):
    pooled = self.encode(b["token_ids"], b["token_mask"], b["images"], b["image_mask"])
    return self.head_loss(pooled, b["task_id"], b["label"])

  def param_counts(self) -> dict:
    encoder = sum(p.numel() for p in self.bert.parameters()) + sum(
        p.numel() for p in self.image_projection.parameters())
    return {"encoder_params": int(encoder),
            "head_params": int(sum(p.numel() for p in self.heads.parameters()))}


def make_optimizer(model, opt):
  """AdamW with the config's hyper-parameters; fused where available, else foreach.

  Returns (optimizer, kind) with kind "fused" or "foreach".
  """
  kwargs = dict(lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                weight_decay=opt.weight_decay)
  try:
    return torch.optim.AdamW(model.parameters(), fused=True, **kwargs), "fused"
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(model.parameters(), foreach=True, **kwargs), "foreach"


def as_torch(batch: dict, device="cpu") -> dict:
  """numpy batch -> torch tensors (int32 -> int64 indices) on `device`."""
  return {k: (torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
              ).to(device) for k, v in batch.items()}


def train_step_fn(model, optimizer, clip_norm, autocast_dtype=None, device_type="cpu"):
  """One usual step: zero_grad, forward (under autocast if given), backward, clip, step."""
  def step(b):
    optimizer.zero_grad(set_to_none=True)
    if autocast_dtype is None:
      loss = model(b)
    else:
      with torch.autocast(device_type, dtype=autocast_dtype):
        loss = model(b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return loss.detach()
  return step
