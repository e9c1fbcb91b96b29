import os
import sys

# Tests import `configs` and `tests.helpers` from the project root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Quiet TensorFlow in this process and every subprocess, before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="Also run the tests marked slow (end-to-end runs, kills, notebooks).")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests; run with --run-slow.")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --run-slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


# --- Data layer (catalogue, synthetic, TFDS builder, tokenizer): shared tiny inputs. ---

import json as _json

import numpy as _np

TINY_TAXONOMY = """\
# A tiny taxonomy in the format of mtl_jax/data/taxonomy.txt, for fast tests.
Clothing > Tops > Blouses: blouse top women chiffon button collar sleeve silk floral office
Clothing > Tops > Tank Tops: tank top sleeveless vest cotton stretch racerback summer casual
Clothing > Tops > Tunics: tunic longline top loose flowy linen embroidered boho sleeve
Clothing > Dresses > Maxi Dresses: dress maxi long floral flowy summer beach chiffon tiered
Clothing > Dresses > Cocktail Dresses: dress cocktail party evening sequin satin knee bodycon
Shoes > Boots > Ankle Boots: boots ankle leather suede heel zip chelsea winter
Shoes > Boots > Rain Boots: boots rain rubber wellington waterproof garden puddle tall
Shoes > Sneakers > Running Shoes: running shoes trainers mesh cushioned marathon jogging sole
Shoes > Sneakers > Skate Shoes: skate shoes canvas vulcanised grip board street flat
Home > Kitchen > Frying Pans: pan frying skillet nonstick cast iron handle omelette
Home > Kitchen > Kettles: kettle electric boil water cordless jug stainless whistle
Home > Kitchen > Knives: knife chef blade steel sharp cutting santoku paring
Home > Bedding > Duvets: duvet quilt down filling warm tog winter double
Home > Bedding > Pillows: pillow cushion memory foam neck support soft sleeping
Garden > Tools > Spades: spade shovel digging blade handle soil garden steel
Garden > Tools > Hoses: hose watering spray nozzle reel garden flexible pipe
Garden > Plants > Seeds: seeds sowing packet flower vegetable organic heirloom germination
Garden > Plants > Bulbs: bulbs tulip daffodil planting spring bloom autumn flower
@generic: new quality premium best value pack set classic modern style durable everyday gift
@brands: acme zenith nova orbit lumen vertex harbor maple cedar willow summit aurora
"""


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory):
  """The tiny demo catalogue (`configs/demo.py:tiny`), generated once per test module."""
  from mtl_jax import synthetic
  from tests.helpers import tiny_config
  out = tmp_path_factory.mktemp("catalogue") / "tiny"
  synthetic.generate_catalogue(out, tiny_config().data.synthetic)
  return out


@pytest.fixture
def tiny_taxonomy(tmp_path):
  """Path of a tiny taxonomy file (4 departments, 8 categories, 18 leaves)."""
  path = tmp_path / "taxonomy.txt"
  path.write_text(TINY_TAXONOMY)
  return path


@pytest.fixture
def write_catalogue():
  """A function writing a catalogue directory from Python objects (lines may be raw strings)."""

  def write(directory, tasks, splits, embeddings=None, image_dim=4, max_images=2):
    directory.mkdir(parents=True, exist_ok=True)
    table = {"format_version": 1, "image_dim": image_dim, "max_images": max_images,
             "tasks": [{"name": n, "classes": list(c)} for n, c in tasks.items()]}
    (directory / "tasks.json").write_text(_json.dumps(table))
    for split in ("train", "validation", "test"):
      lines = [r if isinstance(r, str) else _json.dumps(r) for r in splits.get(split, [])]
      (directory / f"{split}.jsonl").write_text("".join(l + "\n" for l in lines))
    if embeddings is None:
      embeddings = _np.arange(10 * image_dim, dtype=_np.float32).reshape(10, image_dim) / 10
    _np.save(directory / "image_embeddings.npy", _np.asarray(embeddings))
    return directory

  return write
