"""Data preparation for a run: the catalogue (generated if none is configured), its TFDS form in
the workdir, and the tokenizer.

Process 0 of a multi-host job prepares first; the others then reuse its files on a shared
filesystem (or prepare their own copy), never racing on one directory.
"""
import jax
from etils import epath
from jax.experimental import multihost_utils

from mtl_jax import synthetic
from mtl_jax import tfds_builder
from mtl_jax import tokenizer as tokenizer_lib
from mtl_jax import workdir as workdir_lib


def _prepare(config, workdir: epath.Path):
  if config.data.catalogue_dir:
    catalogue_dir = epath.Path(config.data.catalogue_dir)
  else:
    catalogue_dir = workdir / "catalogue"
    synthetic.generate_catalogue(catalogue_dir, config.data.synthetic)
  catalogue = tfds_builder.load_catalogue(str(catalogue_dir), str(workdir / "prepared"),
                                          on_bad_record=config.data.on_bad_record)
  if config.data.tokenizer_dir:
    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer_dir)
  elif config.model.text_init:
    from mtl_jax import pretrained  # Local: only runs that load weights need it.
    tokenizer = pretrained.load_tokenizer_for(config.model.text_init)
  else:
    tokenizer = tokenizer_lib.build_tokenizer(catalogue, str(workdir / workdir_lib.TOKENIZER),
                                              config.data.vocab_size)
  workdir_lib.keep_tokenizer(workdir, tokenizer)
  return catalogue, tokenizer


def prepare_data(config, workdir: epath.Path):
  """(catalogue, tokenizer) of a run, prepared into its workdir once."""
  if jax.process_index() == 0:
    prepared = _prepare(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mtl_jax: data prepared")
    if jax.process_index() > 0:
      prepared = _prepare(config, workdir)
  return prepared


def skipped_summary(catalogue) -> str | None:
  """One line counting the bad records skipped per split, or None where none was."""
  counts = {split: sum(sum(r.values()) for r in per_task.values())
            for split, per_task in catalogue.skipped.items()}
  if not any(counts.values()):
    return None
  return ("Skipped bad records (data.on_bad_record=skip): " +
          ", ".join(f"{split} {n}" for split, n in counts.items()) +
          "; per task and reason in reports/*.json and data's skipped.json.")
