"""A synthetic product catalogue, written in the format of `mtl_jax.catalogue`.

It is the embedded default dataset, and it goes through the same builder and loader as a user's
catalogue. The model behind it:

- **A global taxonomy** (`mtl_jax/data/taxonomy.txt`): department > category > leaf, each leaf
  with 8-14 words, plus generic product words and brand names.
- **Websites (tasks) see the taxonomy through their own hierarchy.** Each site focuses on 1-3
  departments, drawn from a skewed department popularity, so sites overlap and their tasks are
  correlated. It picks a granularity: "coarse" sites merge each category's leaves into one class,
  "fine" sites keep the leaves (finer, harder classes: sibling leaves are close), "mixed" sites
  do either per category. It drops categories to reach its class count (log-uniform in
  `[min_classes, max_classes]`, less only when the taxonomy cannot supply more), names its
  classes in its own style (separator, depth, casing, some classes renamed after their words),
  has its own vocabulary (a few site words mixed into its text, some taxonomy words replaced by
  site synonyms, a subset of the brands), skewed (Zipf) class priors, and label noise: each
  record's label is flipped to another class with the site's rate, uniform in `[0, label_noise]`.
- **Text.** Titles: a brand and 3-8 words, mostly the leaf's, some generic or site words.
  Descriptions: 10-30 words from the leaf, its category and department names, generic and site
  words. All are real words of the taxonomy file.
- **Images.** 0..K embeddings per product from hierarchical clusters: a department centre plus a
  category offset plus a leaf offset (related classes are close), a per-site shift, a per-product
  offset shared by the product's images, and per-image noise. The scales leave a nearest-centroid
  classifier well above chance but far from perfect, so text and images both matter. Stored as
  float16.
- **Sizes** are long-tailed: products per task are log-uniform in `[min_products, max_products]`
  (all splits together), split about 80/10/10 per task with at least one training record.

Determinism and scale. Task t draws everything from its own random streams
(`SeedSequence(seed, spawn_key=(stream, t))`), so a catalogue is byte-identical for a seed
(except the timing in stats.json) and the first tasks of a larger catalogue are the tasks of a
smaller one. Generation streams task by task: a cheap first pass counts each task's images, the
embedding file is preallocated with `open_memmap`, and the second pass appends each task's
records (grouped by task, in task order, in every split) and fills its embedding rows. Files are
written into a temporary sibling directory that is renamed to `out_dir` after the `_COMPLETE`
marker is written, so a killed run never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtl_jax import catalogue

CONFIG_FIELDS = ("num_tasks", "seed", "min_products", "max_products", "min_classes",
                 "max_classes", "image_dim", "max_images", "label_noise")
STATS_FILE = "stats.json"

# Random streams (the first spawn-key element): one for shared structure, two per task.
_GLOBAL, _PLAN, _CONTENT = 0, 1, 2

# Image embeddings. Noise is per coordinate (PRODUCT shared by a product's images, IMAGE per
# image; together ~0.9). The hierarchy's offsets are drawn with std scale / sqrt(D), so that the
# distance between two centres, in units of the noise, does not depend on D: about 1.3 for
# sibling leaves, 2.3 for leaves of sibling categories and 4 across departments (one image).
DEPARTMENT_SCALE = 2.0
CATEGORY_SCALE = 1.2
LEAF_SCALE = 0.85
SITE_SHIFT_SCALE = 1.0
PRODUCT_SCALE = 0.8
IMAGE_SCALE = 0.45

# Where a text's words come from. Title: leaf, sibling leaf (same category), generic, site.
# Description: leaf, sibling leaf, category name, department name, generic, site. A site's text
# quality q in [0.6, 1] scales the leaf share; the rest goes to generic words.
_TITLE_SOURCES = np.array([0.40, 0.20, 0.25, 0.15])
_DESCRIPTION_SOURCES = np.array([0.15, 0.12, 0.08, 0.05, 0.45, 0.15])
_GRANULARITIES = ("coarse", "mixed", "fine")
_SEPARATORS = (" > ", " / ", " | ", " - ", ">")


def _words(name: str) -> list[str]:
  """Lowercase words of a department/category/leaf name ("Women's Tops" -> women, tops)."""
  return [w for w in re.findall(r"[a-z0-9]+", name.lower().replace("'s", "")) if len(w) > 1]


@dataclasses.dataclass(frozen=True, eq=False)  # Holds arrays: compare by identity.
class Taxonomy:
  """The global taxonomy, with every word as an index into `vocab`.

  Attributes:
    departments: department names [Dp].
    categories: category names [C] (a name may recur in several departments).
    category_department: int [C], each category's department.
    leaves: leaf names [L].
    leaf_category: int [L], each leaf's category.
    leaf_words: per leaf, its words.
    generic: generic product words.
    brands: brand names (single words).
    vocab: every distinct word (leaf words, name words, generic words, brands), sorted.
    digest: a hash of the taxonomy file's text, recorded with each catalogue made from it.
  """
  departments: tuple[str, ...]
  categories: tuple[str, ...]
  category_department: np.ndarray
  leaves: tuple[str, ...]
  leaf_category: np.ndarray
  leaf_words: tuple[tuple[str, ...], ...]
  generic: tuple[str, ...]
  brands: tuple[str, ...]
  vocab: tuple[str, ...]
  digest: str = ""

  @property
  def leaf_department(self) -> np.ndarray:
    return self.category_department[self.leaf_category]


def default_taxonomy_path() -> Path:
  return Path(str(importlib.resources.files("mtl_jax").joinpath("data", "taxonomy.txt")))


def load_taxonomy(path: str | os.PathLike | None = None) -> Taxonomy:
  """Parses a taxonomy file (default: the package's `data/taxonomy.txt`).

  Format: `#` comments and blank lines are ignored; one leaf per line,
  `Department > Category > Leaf: w1 w2 ...`; a line `@generic: w w ...` and a line
  `@brands: w w ...`.
  """
  path = Path(path) if path is not None else default_taxonomy_path()
  departments, categories, cat_dept, leaves, leaf_cat, leaf_words = [], [], [], [], [], []
  dept_ids, cat_ids = {}, {}
  generic, brands = [], []
  text = path.read_text(encoding="utf-8")
  for line_no, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    head, sep, tail = line.rpartition(":")
    if not sep:
      raise ValueError(f"{path} line {line_no}: no ':' in {line!r}.")
    words = tail.split()
    if head.startswith("@"):
      target = {"@generic": generic, "@brands": brands}.get(head.strip())
      if target is None:
        raise ValueError(f"{path} line {line_no}: unknown directive {head!r}.")
      target.extend(words)
      continue
    parts = [p.strip() for p in head.split(">")]
    if len(parts) != 3 or not all(parts) or not words:
      raise ValueError(f"{path} line {line_no}: expected 'Department > Category > Leaf: words'.")
    dept, cat, leaf = parts
    if dept not in dept_ids:
      dept_ids[dept] = len(departments)
      departments.append(dept)
    if (dept, cat) not in cat_ids:
      cat_ids[dept, cat] = len(categories)
      categories.append(cat)
      cat_dept.append(dept_ids[dept])
    leaves.append(leaf)
    leaf_cat.append(cat_ids[dept, cat])
    leaf_words.append(tuple(w.lower() for w in words))
  if not leaves or not generic or not brands:
    raise ValueError(f"{path}: needs leaves, an @generic line and an @brands line.")
  vocab = set(generic) | {b.lower() for b in brands}
  for words in leaf_words:
    vocab.update(words)
  for name in departments + categories:
    vocab.update(_words(name))
  return Taxonomy(tuple(departments), tuple(categories), np.array(cat_dept, np.int64),
                  tuple(leaves), np.array(leaf_cat, np.int64), tuple(leaf_words),
                  tuple(w.lower() for w in generic), tuple(b.lower() for b in brands),
                  tuple(sorted(vocab)), hashlib.sha256(text.encode()).hexdigest()[:16])


class _Pools:
  """Groups of ids (words of a leaf, leaves of a category) as one flat array, for sampling."""

  def __init__(self, groups: list[list[int]]):
    self.lengths = np.array([len(g) for g in groups], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
    self.flat = np.array([w for g in groups for w in g], np.int64)

  def pick(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One word of each `group[i]`, chosen by `u[i]` in [0, 1)."""
    return self.flat[self.offsets[group] + (u * self.lengths[group]).astype(np.int64)]


class _World:
  """What every site shares: word ids, pools, department popularity, embedding centres."""

  def __init__(self, tax: Taxonomy, seed: int, image_dim: int):
    self.tax = tax
    word_id = {w: i for i, w in enumerate(tax.vocab)}
    self.vocab = np.array(tax.vocab, dtype=object)
    self.leaf_pool = _Pools([[word_id[w] for w in ws] for ws in tax.leaf_words])
    # Category/department names without usable words fall back to their first leaf's words.
    first_leaf = {}
    for leaf, cat in enumerate(tax.leaf_category):
      first_leaf.setdefault(int(cat), leaf)
    self.category_pool = _Pools([[word_id[w] for w in _words(c)] or
                                 [word_id[w] for w in tax.leaf_words[first_leaf[i]]]
                                 for i, c in enumerate(tax.categories)])
    self.department_pool = _Pools([[word_id[w] for w in _words(d)] or [word_id[tax.generic[0]]]
                                   for d in tax.departments])
    self.generic_ids = np.array([word_id[w] for w in tax.generic], np.int64)
    self.brand_ids = np.array([word_id[b] for b in tax.brands], np.int64)
    self.leaf_word_ids = np.unique(self.leaf_pool.flat)
    self.categories_of_dept = [np.flatnonzero(tax.category_department == d)
                               for d in range(len(tax.departments))]
    self.leaves_of_cat = [np.flatnonzero(tax.leaf_category == c)
                          for c in range(len(tax.categories))]

    rng = _rng(seed, _GLOBAL, 0)
    n_dept = len(tax.departments)
    rank = rng.permutation(n_dept)
    popularity = (rank + 1.0) ** -0.8
    self.dept_popularity = popularity / popularity.sum()
    unit = 1.0 / np.sqrt(image_dim)
    dept_c = rng.normal(0, DEPARTMENT_SCALE * unit, (n_dept, image_dim))
    cat_c = dept_c[tax.category_department] + rng.normal(
        0, CATEGORY_SCALE * unit, (len(tax.categories), image_dim))
    self.leaf_centres = cat_c[tax.leaf_category] + rng.normal(
        0, LEAF_SCALE * unit, (len(tax.leaves), image_dim))
    self.leaves_of_category = _Pools([list(l) for l in self.leaves_of_cat])


def _rng(seed: int, stream: int, task: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, task)))


def _log_uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
  """An integer in [low, high], log-uniform: many small values, a long tail of large ones."""
  return int(min(high, np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1))))))


def _plan(cfg: dict[str, Any], task: int) -> tuple[int, np.ndarray]:
  """A task's product count and per-product image counts: cheap, from its own stream."""
  rng = _rng(cfg["seed"], _PLAN, task)
  n = _log_uniform_int(rng, cfg["min_products"], cfg["max_products"])
  k = cfg["max_images"]
  p_none = rng.uniform(0.0, 0.3)
  counts = rng.integers(1, k + 1, n) if k > 0 else np.zeros(n, np.int64)
  counts = np.where(rng.random(n) < p_none, 0, counts)
  return n, counts.astype(np.int64)


@dataclasses.dataclass
class _Site:
  """One website's view of the taxonomy."""
  class_names: list[str]
  class_leaves: list[np.ndarray]  # Per class, the global leaves it holds.
  leaf_probs: list[np.ndarray]  # Per class, how often each of its leaves is sold.
  class_prior: np.ndarray
  word_map: np.ndarray  # Global word id -> this site's word id (site synonyms).
  site_words: np.ndarray
  brands: np.ndarray
  class_brands: np.ndarray  # [classes, 2] each class's favourite brands.
  shift: np.ndarray
  noise_rate: float
  text_quality: float
  granularity: str
  departments: list[int]


def _make_site(world: _World, cfg: dict[str, Any], rng: np.random.Generator) -> _Site:
  tax = world.tax
  n_dept = len(tax.departments)
  n_focus = min(n_dept, int(rng.integers(1, 4)))
  depts = list(rng.choice(n_dept, n_focus, replace=False, p=world.dept_popularity))
  granularity = _GRANULARITIES[rng.choice(3, p=[0.35, 0.35, 0.3])]
  p_split = {"coarse": 0.0, "mixed": 0.5, "fine": 1.0}[granularity]
  target = _log_uniform_int(rng, cfg["min_classes"], cfg["max_classes"])

  def units_of(dept_list, split_all=False):
    units = []  # (leaves, is_leaf_unit)
    for d in dept_list:
      for c in world.categories_of_dept[d]:
        leaves = world.leaves_of_cat[c]
        if len(leaves) > 1 and (split_all or rng.random() < p_split):
          units.extend((np.array([l]), True) for l in leaves)
        else:
          units.append((leaves, len(leaves) == 1))
    return units

  units = units_of(depts)
  # Too few classes for the target: widen to the next popular departments, then split finer.
  others = [d for d in np.argsort(-world.dept_popularity, kind="stable") if d not in depts]
  while len(units) < target and others:
    depts.append(others.pop(0))
    units = units_of(depts)
  if len(units) < target:
    units = units_of(depts, split_all=True)
  # Dropped categories: the site sells only a random subset of what it could.
  keep = np.sort(rng.choice(len(units), min(target, len(units)), replace=False))
  units = [units[i] for i in keep]

  # Site synonyms: a few taxonomy words are consistently replaced by other taxonomy words.
  word_map = np.arange(len(world.vocab))
  syn_rate = rng.uniform(0.0, 0.2)
  chosen = world.leaf_word_ids[rng.random(len(world.leaf_word_ids)) < syn_rate]
  word_map[chosen] = rng.choice(world.leaf_word_ids, len(chosen))
  site_words = rng.choice(world.generic_ids, min(len(world.generic_ids), int(rng.integers(3, 11))),
                          replace=False)
  brands = rng.choice(world.brand_ids, min(len(world.brand_ids), int(rng.integers(5, 31))),
                      replace=False)

  # Site naming: separator, depth, casing, and renames after the class's own (site) words.
  sep = _SEPARATORS[rng.integers(len(_SEPARATORS))]
  with_department = rng.random() < 0.5
  casing = rng.choice(3, p=[0.6, 0.25, 0.15])
  rename_rate = rng.uniform(0.0, 0.4)
  names, seen = [], set()
  for leaves, is_leaf in units:
    cat = int(tax.leaf_category[leaves[0]])
    path = [tax.departments[tax.category_department[cat]]] if with_department else []
    path.append(tax.categories[cat])
    if is_leaf:
      path.append(tax.leaves[leaves[0]])
    if rng.random() < rename_rate:
      pool = world.leaf_pool
      ids = pool.flat[pool.offsets[leaves[0]]:pool.offsets[leaves[0]] + pool.lengths[leaves[0]]]
      picked = word_map[rng.choice(ids, min(2, len(ids)), replace=False)]
      path[-1] = " ".join(str(world.vocab[w]).capitalize() for w in picked)
    name = sep.join(path)
    name = (name, name.lower(), name.upper())[casing]
    base, k = name, 2
    while name in seen:  # Renames and repeated category names can collide.
      name, k = f"{base} ({k})", k + 1
    seen.add(name)
    names.append(name)

  n_classes = len(units)
  exponent = rng.uniform(0.3, 1.3)
  prior = (rng.permutation(n_classes) + 1.0) ** -exponent
  return _Site(
      class_names=names,
      class_leaves=[u[0] for u in units],
      leaf_probs=[rng.dirichlet(np.full(len(u[0]), 2.0)) for u in units],
      class_prior=prior / prior.sum(),
      word_map=word_map,
      site_words=site_words,
      brands=brands,
      class_brands=rng.choice(brands, (n_classes, 2)),
      shift=rng.normal(0, SITE_SHIFT_SCALE / np.sqrt(cfg["image_dim"]), cfg["image_dim"]),
      noise_rate=float(rng.uniform(0.0, cfg["label_noise"])) if cfg["label_noise"] > 0 else 0.0,
      text_quality=float(rng.uniform(0.6, 1.0)),
      granularity=granularity,
      departments=[int(d) for d in depts],
  )


def _sources(base: np.ndarray, quality: float, generic: int) -> np.ndarray:
  """Source probabilities of one site: leaf share scaled by its quality, the rest generic."""
  p = base.copy()
  p[generic] += p[0] * (1.0 - quality)
  p[0] *= quality
  return p


def _sample_words(world: _World, site: _Site, rng: np.random.Generator, leaf: np.ndarray,
                  lengths: np.ndarray, sources: np.ndarray) -> tuple[list[str], np.ndarray]:
  """Words of a batch of texts: a flat list of strings and each text's end offset."""
  owner = np.repeat(np.arange(len(leaf)), lengths)
  n = len(owner)
  src = rng.choice(len(sources), n, p=sources)
  u = rng.random(n)
  leaf_w = np.repeat(leaf, lengths)
  tax = world.tax
  # Leaf words follow a random order of the leaf's words per text, so a text repeats one only
  # after using them all.
  pool = world.leaf_pool
  keys = rng.random((len(leaf), int(pool.lengths.max())))
  keys[np.arange(keys.shape[1]) >= pool.lengths[leaf][:, None]] = np.inf
  order = np.argsort(keys, axis=1)
  position = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  leaf_ids = pool.flat[pool.offsets[leaf_w] + order[owner, position % pool.lengths[leaf_w]]]
  sibling = world.leaves_of_category.pick(tax.leaf_category[leaf_w], rng.random(n))
  sibling_ids = pool.pick(sibling, u)
  if len(sources) == 4:  # Title: leaf, sibling leaf, generic, site.
    options = [leaf_ids, sibling_ids,
               world.generic_ids[(u * len(world.generic_ids)).astype(np.int64)],
               site.site_words[(u * len(site.site_words)).astype(np.int64)]]
  else:  # Description: leaf, category name, department name, generic, site.
    cat_w = tax.leaf_category[leaf_w]
    options = [leaf_ids, sibling_ids,
               world.category_pool.pick(cat_w, u),
               world.department_pool.pick(tax.category_department[cat_w], u),
               world.generic_ids[(u * len(world.generic_ids)).astype(np.int64)],
               site.site_words[(u * len(site.site_words)).astype(np.int64)]]
  ids = np.choose(src, options)
  ids = np.where(src <= 1, site.word_map[ids], ids)  # Site synonyms replace leaf words.
  return world.vocab[ids].tolist(), np.cumsum(lengths)


def _task_records(world: _World, cfg: dict[str, Any], task: int, name: str, row0: int):
  """Yields (split, json line) of one task in split order, and returns its embeddings."""
  n, n_images = _plan(cfg, task)
  rng = _rng(cfg["seed"], _CONTENT, task)
  site = _make_site(world, cfg, rng)
  n_classes = len(site.class_names)

  # Labels, leaves and noise.
  true = rng.choice(n_classes, n, p=site.class_prior)
  leaf = np.empty(n, np.int64)
  for c in range(n_classes):
    idx = np.flatnonzero(true == c)
    leaf[idx] = rng.choice(site.class_leaves[c], len(idx), p=site.leaf_probs[c])
  flip = rng.random(n) < site.noise_rate
  label = np.where(flip & (n_classes > 1), (true + rng.integers(1, max(2, n_classes), n))
                   % n_classes, true)

  # Text.
  favourite = rng.random(n) < 0.5
  brand = np.where(favourite, site.class_brands[true, rng.integers(0, 2, n)],
                   site.brands[rng.integers(0, len(site.brands), n)])
  brand_names = world.vocab[brand].tolist()
  t_words, t_end = _sample_words(world, site, rng, leaf, rng.integers(3, 9, n),
                                 _sources(_TITLE_SOURCES, site.text_quality, 2))
  d_words, d_end = _sample_words(world, site, rng, leaf, rng.integers(10, 31, n),
                                 _sources(_DESCRIPTION_SOURCES, site.text_quality, 4))

  # Images: leaf centre + site shift + product offset + image noise.
  total = int(n_images.sum())
  owner = np.repeat(np.arange(n), n_images)
  product = rng.normal(0, PRODUCT_SCALE, (n, cfg["image_dim"]))
  emb = (world.leaf_centres[leaf[owner]] + site.shift + product[owner]
         + rng.normal(0, IMAGE_SCALE, (total, cfg["image_dim"])))
  row_start = row0 + np.concatenate([[0], np.cumsum(n_images)[:-1]])

  # Splits: ~80/10/10, at least one training record.
  order = rng.permutation(n)
  n_train = max(1, int(round(0.8 * n)))
  n_val = min(n - n_train, int(round(0.1 * n)))
  split_of = np.empty(n, np.int64)
  split_of[order[:n_train]] = 0
  split_of[order[n_train:n_train + n_val]] = 1
  split_of[order[n_train + n_val:]] = 2

  lines = ([], [], [])
  width = max(6, len(str(n - 1)))
  t_prev = d_prev = 0
  for i in range(n):
    title = (brand_names[i] + " " + " ".join(t_words[t_prev:t_end[i]])).title()
    description = " ".join(d_words[d_prev:d_end[i]]).capitalize() + "."
    t_prev, d_prev = t_end[i], d_end[i]
    r = int(row_start[i])
    lines[split_of[i]].append(json.dumps({
        "id": f"{name}-{i:0{width}d}", "task": name, "label": site.class_names[label[i]],
        "title": title, "description": description,
        "images": list(range(r, r + int(n_images[i])))}))
  info = {"name": name, "num_classes": n_classes, "granularity": site.granularity,
          "departments": [world.tax.departments[d] for d in site.departments],
          "label_noise": round(site.noise_rate, 4),
          "products": {s: len(lines[i]) for i, s in enumerate(catalogue.SPLITS)}}
  return site.class_names, lines, emb.astype(np.float16), info


def _config_dict(cfg: Any) -> dict[str, Any]:
  get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
  out = {k: get(k) for k in CONFIG_FIELDS}
  for k in CONFIG_FIELDS:
    out[k] = float(out[k]) if k == "label_noise" else int(out[k])
  if out["num_tasks"] < 1 or not 1 <= out["min_products"] <= out["max_products"]:
    raise ValueError(f"Need num_tasks >= 1 and 1 <= min_products <= max_products: {out}.")
  if not 1 <= out["min_classes"] <= out["max_classes"]:
    raise ValueError(f"Need 1 <= min_classes <= max_classes: {out}.")
  if out["image_dim"] < 1 or out["max_images"] < 0 or not 0 <= out["label_noise"] < 1:
    raise ValueError(f"Need image_dim >= 1, max_images >= 0, 0 <= label_noise < 1: {out}.")
  return out


def task_name(task: int, num_tasks: int) -> str:
  return f"site{task:0{max(4, len(str(num_tasks - 1)))}d}"


def generate_catalogue(out_dir: str | os.PathLike, cfg: Any,
                       taxonomy: str | os.PathLike | Taxonomy | None = None) -> dict[str, Any]:
  """Writes a synthetic catalogue into `out_dir` and returns its stats (also in stats.json).

  A complete catalogue already in `out_dir` made with the same config and taxonomy is reused
  as is.

  Args:
    out_dir: the catalogue directory to create.
    cfg: a ConfigDict, object or dict with the fields of `c.data.synthetic` (`CONFIG_FIELDS`).
    taxonomy: a taxonomy file or `Taxonomy`; default: the package's `data/taxonomy.txt`.

  Returns:
    {"config", "num_tasks", "products": {split: n}, "images", "tasks": [per-task info],
     "generation_seconds"}.

  Raises:
    FileExistsError: `out_dir` exists but is not a complete catalogue made with this config
      and taxonomy.
  """
  start = time.perf_counter()
  config = _config_dict(cfg)
  out_dir = Path(out_dir)
  tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
  if out_dir.exists():
    stats_path = out_dir / STATS_FILE
    if catalogue.is_complete(out_dir) and stats_path.exists():
      stats = json.loads(stats_path.read_text())
      if stats.get("config") == config and stats.get("taxonomy") == tax.digest:
        return stats
    raise FileExistsError(f"{out_dir} exists and is not a complete synthetic catalogue made with "
                          f"{config} and taxonomy {tax.digest}. Remove it or choose another "
                          "directory.")
  world = _World(tax, config["seed"], config["image_dim"])
  num_tasks = config["num_tasks"]

  # First pass: image counts, so the embedding file can be preallocated.
  images_per_task = np.array([_plan(config, t)[1].sum() for t in range(num_tasks)], np.int64)
  row0 = np.concatenate([[0], np.cumsum(images_per_task)[:-1]])

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    emb = np.lib.format.open_memmap(tmp / catalogue.EMBEDDINGS_FILE, mode="w+",
                                    dtype=np.float16,
                                    shape=(int(images_per_task.sum()), config["image_dim"]))
    files = [open(tmp / catalogue.split_file(s), "w", encoding="utf-8")
             for s in catalogue.SPLITS]
    tasks, infos = [], []
    try:
      for t in range(num_tasks):
        name = task_name(t, num_tasks)
        classes, lines, rows, info = _task_records(world, config, t, name, int(row0[t]))
        for f, split_lines in zip(files, lines):
          if split_lines:
            f.write("\n".join(split_lines) + "\n")
        emb[row0[t]:row0[t] + len(rows)] = rows
        tasks.append({"name": name, "classes": classes})
        infos.append(info)
    finally:
      for f in files:
        f.close()
    emb.flush()
    del emb
    table = {"format_version": catalogue.FORMAT_VERSION, "image_dim": config["image_dim"],
             "max_images": config["max_images"], "tasks": tasks}
    (tmp / catalogue.TASKS_FILE).write_text(json.dumps(table, indent=1) + "\n")
    stats = {
        "config": config,
        "taxonomy": tax.digest,
        "num_tasks": num_tasks,
        "products": {s: sum(i["products"][s] for i in infos) for s in catalogue.SPLITS},
        "images": int(images_per_task.sum()),
        "generation_seconds": round(time.perf_counter() - start, 3),
        "tasks": infos,
    }
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    (tmp / catalogue.COMPLETE_MARKER).write_text("")
    try:
      tmp.rename(out_dir)
    except OSError:
      # Another process finished first: keep its catalogue if it matches.
      if catalogue.is_complete(out_dir):
        shutil.rmtree(tmp)
        return generate_catalogue(out_dir, cfg, tax)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return stats


def rename_tasks(out_dir: str | os.PathLike, prefix: str) -> None:
  """Renames a generated catalogue's tasks `site0000`... to `<prefix>0000`... (tasks.json and
  every record), e.g. to add a generated website to a model trained on another one."""
  out_dir = Path(out_dir)
  table = json.loads((out_dir / catalogue.TASKS_FILE).read_text())
  names = {t["name"]: prefix + t["name"][len("site"):] for t in table["tasks"]}
  for task in table["tasks"]:
    task["name"] = names[task["name"]]
  for split in catalogue.SPLITS:
    path = out_dir / catalogue.split_file(split)
    lines = []
    with open(path, encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        record["task"] = names[record["task"]]
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
  (out_dir / catalogue.TASKS_FILE).write_text(json.dumps(table, indent=1, ensure_ascii=False))


def main(argv=None) -> None:
  """Writes a synthetic catalogue (the `data.synthetic` section of a config) to a directory.

    python -m mtl_jax.synthetic --config=configs/demo.py --out=new_site [--num_tasks=1]
        [--seed=7] [--name_prefix=newsite]
  """
  from absl import flags
  from ml_collections import config_flags

  from mtl_jax import cli
  args = cli.flag_values()
  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]); its "
                                  "data.synthetic section is used.", flag_values=args)
  flags.DEFINE_string("out", None, "The catalogue directory to write.", flag_values=args,
                      required=True)
  flags.DEFINE_integer("num_tasks", None, "Websites (default: the config's).", flag_values=args)
  flags.DEFINE_integer("seed", None, "Generator seed (default: the config's).", flag_values=args)
  flags.DEFINE_string("name_prefix", "site", "Task names are <prefix>0000, <prefix>0001, ...",
                      flag_values=args)
  cli.parse(args, argv, "python -m mtl_jax.synthetic")
  if args.config is None:
    raise flags.ValidationError("--config is required (e.g. --config=configs/demo.py).")
  cfg = args.config.data.synthetic
  with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
    if args.num_tasks is not None:
      cfg.num_tasks = args.num_tasks
    if args.seed is not None:
      cfg.seed = args.seed
  if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", args.name_prefix):
    raise flags.ValidationError(f"--name_prefix={args.name_prefix!r}: use letters, digits, _ "
                                "and -, starting with a letter.")
  stats = generate_catalogue(args.out, cfg)
  if args.name_prefix != "site":
    rename_tasks(args.out, args.name_prefix)
  print(f"{args.out}: {stats['num_tasks']} tasks, "
        f"{', '.join(f'{n} {s}' for s, n in stats['products'].items())} products", flush=True)


if __name__ == "__main__":
  from mtl_jax import cli as _cli
  _cli.run(main)
