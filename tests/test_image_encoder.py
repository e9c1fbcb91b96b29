"""Tests for mtl_jax.image_encoder: PyTorch parity, the restricted unpickler, and the CLI."""
import importlib.util
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest

from mtl_jax import image_encoder as ie

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_WEIGHTS = importlib.util.find_spec(ie.PACKAGE) is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="PyTorch reference not installed: pip install torch==2.13.0 (CPU)")
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason=f"pretrained weights not installed: {ie.PIP_INSTALL}")


def _synthetic_images() -> np.ndarray:
  """Two 224x224 uint8 RGB images: a colour gradient and a tinted checkerboard."""
  y, x = np.mgrid[0:224, 0:224].astype(np.float32)
  gradient = np.stack([x / 223 * 255, y / 223 * 255, (x + y) / 446 * 255], -1)
  checks = ((x // 16 + y // 16) % 2)[..., None] * np.array([200.0, 60.0, 120.0]) + 30.0
  return np.stack([gradient, checks]).round().astype(np.uint8)


def _torch_reference(state_dict):
  """EfficientNet-Lite0 in plain torch, as the checkpoint's own (lukemelas-style) code builds it."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class SameConv(nn.Conv2d):
    """TF SAME padding: total pad max((ceil(i/s)-1)*s + k - i, 0), the extra pixel after."""

    def forward(self, x):
      pads = []
      for i, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
        p = max((math.ceil(i / s) - 1) * s + k - i, 0)
        pads.append((p // 2, p - p // 2))
      x = F.pad(x, [*pads[1], *pads[0]])
      return super().forward(x)

  def conv(i, o, k, s=1, groups=1):
    return SameConv(i, o, k, s, groups=groups, bias=False)

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)

  class Block(nn.Module):

    def __init__(self, i, o, k, s, e):
      super().__init__()
      h = i * e
      self.expand = e != 1
      if self.expand:
        self._expand_conv, self._bn0 = conv(i, h, 1), bn(h)
      self._depthwise_conv, self._bn1 = conv(h, h, k, s, groups=h), bn(h)
      self._project_conv, self._bn2 = conv(h, o, 1), bn(o)
      self.skip = s == 1 and i == o

    def forward(self, x):
      h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
      h = F.relu6(self._bn1(self._depthwise_conv(h)))
      h = self._bn2(self._project_conv(h))
      return h + x if self.skip else h

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self._conv_stem, self._bn0 = conv(3, 32, 3, 2), bn(32)
      blocks, i = [], 32
      for r, k, s, e, o in ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40),
                            (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192),
                            (1, 3, 1, 6, 320)):
        for n in range(r):
          blocks.append(Block(i, o, k, s if n == 0 else 1, e))
          i = o
      self._blocks = nn.ModuleList(blocks)
      self._conv_head, self._bn1 = conv(320, 1280, 1), bn(1280)
      self._fc = nn.Linear(1280, 1000)

    def forward(self, pixels):
      x = (pixels - 127.0) / 128.0
      x = F.relu6(self._bn0(self._conv_stem(x)))
      for block in self._blocks:
        x = block(x)
      pooled = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
      return pooled, self._fc(pooled)

  net = Net()
  net.load_state_dict(state_dict, strict=True)
  return net.eval()


@pytest.fixture(scope="module")
def encoder():
  return ie.default_encoder()


@needs_weights
def test_checkpoint_loads_without_torch(monkeypatch):
  # `import torch` (or torch._utils) now fails, so any attempt to use torch would raise.
  monkeypatch.setitem(sys.modules, "torch", None)
  state = ie.load_torch_checkpoint(ie.checkpoint_path())
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_fc.weight"].dtype == np.float32
  n_params = sum(v.size for k, v in state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert n_params == 4_652_008


@needs_torch
@needs_weights
def test_parity_with_pytorch_reference(encoder):
  import torch  # pylint: disable=g-import-not-at-top
  path = ie.checkpoint_path()
  ref_state = torch.load(path, weights_only=True)
  ours = ie.load_torch_checkpoint(path)
  assert list(ours) == list(ref_state)
  for k, v in ref_state.items():
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)

  images = _synthetic_images()
  net = _torch_reference(ref_state)
  with torch.no_grad():
    ref_pooled, ref_logits = net(torch.from_numpy(images).permute(0, 3, 1, 2).float())
  pooled, logits = encoder(images)
  assert pooled.shape == (2, ie.EMBED_DIM) and logits.shape == (2, ie.NUM_CLASSES)
  np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=0)
  assert not np.allclose(pooled[0], pooled[1])  # Different images, different features.


class _Evil:

  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def test_restricted_unpickler_rejects_other_globals(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  # A legacy-format header followed by a payload that would run os.system if unpickled.
  data = b"".join(pickle.dumps(o, protocol=2) for o in (
      ie._LEGACY_MAGIC, ie._LEGACY_PROTOCOL, {"little_endian": True}, {"w": _Evil()}))
  evil = tmp_path / "evil.pth"
  evil.write_bytes(data)
  with pytest.raises(ie.UnsafeCheckpointError, match="system"):
    ie.load_torch_checkpoint(evil)
  assert not (tmp_path / "PWNED").exists()


def test_out_of_bounds_tensor_view_is_rejected():
  storage = ie._Storage("0", np.dtype(np.float32), 4)
  storage.data = np.zeros(4, np.float32)
  with pytest.raises(ie.UnsafeCheckpointError, match="past its storage"):
    ie._LazyTensor(storage, 2, (3,), (1,)).materialize()


def test_preprocess_crops_centre_and_flattens_alpha():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  wide = np.zeros((100, 300, 4), np.uint8)
  wide[:, 100:200] = (255, 0, 0, 255)  # Opaque red square in the middle, transparent sides.
  out = ie.preprocess_image(Image.fromarray(wide, "RGBA"))
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # The centre crop (87.5% of the 100-px side) lies inside the red square.
  np.testing.assert_array_equal(out[112, 112], [255, 0, 0])
  np.testing.assert_array_equal(ie.preprocess_image(Image.fromarray(wide[:, :50], "RGBA"))[0, 0],
                                [255, 255, 255])  # Transparent -> white, not black.


@needs_weights
def test_cli_end_to_end(tmp_path, encoder):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "photos"
  (images / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = ["a.png", "b.png", "sub/c.png"]
  for i, name in enumerate(names):
    pixels = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / name)
  (images / "notes.txt").write_text("not an image, ignored by extension")
  out, index = tmp_path / "emb.npy", tmp_path / "out.json"

  ie.main(["--images_dir", str(images), "--output", str(out), "--index", str(index)])
  emb = np.load(out)
  assert emb.shape == (3, ie.EMBED_DIM) and emb.dtype == np.float16
  assert np.isfinite(emb).all()
  rows = json.loads(index.read_text())["rows"]
  assert rows == {"a.png": 0, "b.png": 1, "sub/c.png": 2}
  direct = ie.embed_images([images / n for n in names], encoder=encoder)
  assert direct.shape == (3, ie.EMBED_DIM) and direct.dtype == np.float32
  np.testing.assert_allclose(emb, direct, atol=1e-2, rtol=1e-2)

  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
  with pytest.raises(SystemExit, match="broken.png"):
    ie.main(["--images_dir", str(images), "--output", str(out), "--index", str(index)])
  with pytest.raises(ie.ImageLoadError, match="missing.jpg"):
    ie.embed_images([images / "missing.jpg"], encoder=encoder)

  ie.main(["--images_dir", str(images), "--output", str(out), "--index", str(index),
           "--skip_bad"])
  result = json.loads(index.read_text())
  assert np.load(out).shape == (3, ie.EMBED_DIM)
  assert result["rows"] == {"a.png": 0, "b.png": 1, "sub/c.png": 2}
  assert [s["path"] for s in result["skipped"]] == ["broken.png"]
