"""The text tokenizer: a lowercase WordPiece vocabulary trained on the catalogue, or a local one.

`build_tokenizer` trains a BERT-style WordPiece vocabulary on (a sample of) the train split's
titles and descriptions, with the special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4,
and saves it as `vocab.txt`; a directory that already holds one is reused, so a resumed run keeps
its token ids. `load_tokenizer` opens any directory with a `vocab.txt` (and optionally a
`tokenizer.json`, e.g. a pretrained BERT-family checkpoint's), offline. `encode_batch` turns
products into fixed-length `[CLS] title [SEP] description [SEP]` id and mask arrays.

The vocabulary is learnt here (`train_wordpiece`: byte-pair-style merges over words split by
BERT's normaliser and pre-tokeniser, ties broken by the pieces' text) rather than by the
`tokenizers` WordPieceTrainer, whose result changes from run to run on the same texts; encoding
goes through `tokenizers` (BertTokenizerFast). Training on the same texts gives the same
vocabulary; still, in a multi-host run let one process build it and the others load it.
"""
from __future__ import annotations

import collections
import copy
import heapq
import itertools
import os
import re
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import transformers

if TYPE_CHECKING:
  from mtl_jax.tfds_builder import Catalogue

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"
MAX_TRAINING_TEXTS = 100_000
_READ_BATCH = 1024
# BERT's pre-tokeniser: runs of letters/digits, and each punctuation mark ("_" included) alone.
_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")
# BERT's normaliser drops control characters other than tab and line breaks.
_ASCII_CONTROL = {c: None for c in (*range(32), 127) if chr(c) not in "\t\n\r"}


def catalogue_texts(catalogue: Catalogue, max_texts: int = MAX_TRAINING_TEXTS,
                    seed: int = 0) -> Iterator[str]:
  """`title + " " + description` of up to `max_texts` train records, spread over all tasks."""
  src = catalogue.sources["train"]
  n = len(src)
  if n <= max_texts:
    indices = np.arange(n)
  else:  # Records are grouped by task: sample across the split, not its first tasks.
    indices = np.sort(np.random.default_rng(seed).choice(n, max_texts, replace=False))
  for start in range(0, len(indices), _READ_BATCH):
    for ex in src.__getitems__(indices[start:start + _READ_BATCH].tolist()):
      yield f"{ex['title']} {ex['description']}"


def build_tokenizer(source: Catalogue | Iterable[str], out_dir: str | os.PathLike,
                    vocab_size: int, max_texts: int = MAX_TRAINING_TEXTS
                    ) -> transformers.PreTrainedTokenizerFast:
  """Trains (or reuses) a lowercase WordPiece vocabulary in `out_dir/vocab.txt`.

  Args:
    source: a `Catalogue` (its train split is sampled) or an iterable of texts.
    out_dir: where `vocab.txt` is written; if it is already there, it is loaded instead.
    vocab_size: the vocabulary's size, special tokens included (smaller when the texts have
      fewer pieces worth keeping; larger only if their characters alone exceed it).
    max_texts: the most texts to train on.

  Returns:
    A `BertTokenizerFast`.
  """
  out_dir = Path(out_dir)
  if (out_dir / VOCAB_FILE).exists():
    return load_tokenizer(out_dir)
  if hasattr(source, "sources"):
    texts = catalogue_texts(source, max_texts)
  else:
    texts = itertools.islice(iter(source), max_texts)
  vocab = train_wordpiece(count_words(texts), vocab_size)
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = out_dir / f".{VOCAB_FILE}.tmp-{os.getpid()}"
  tmp.write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
  os.replace(tmp, out_dir / VOCAB_FILE)  # Atomic: a reader never sees half a vocabulary.
  return load_tokenizer(out_dir)


def count_words(texts: Iterable[str], chunk: int = 1000) -> collections.Counter:
  """Word counts after BERT normalisation (lowercase, accents stripped) and pre-tokenisation.

  Texts are normalised a chunk at a time (ASCII chunks in Python, others by the BERT
  normaliser) and split into words and single punctuation marks by a regex equivalent to BERT's
  pre-tokeniser on such text; this is several times faster than one call per text.
  """
  from tokenizers import normalizers

  normalizer = normalizers.BertNormalizer(lowercase=True)
  counts = collections.Counter()
  texts = iter(texts)
  while batch := list(itertools.islice(texts, chunk)):
    text = "\n".join(batch)
    if text.isascii():
      text = text.lower().translate(_ASCII_CONTROL)
    else:
      text = normalizer.normalize_str(text)
    counts.update(_WORD.findall(text))
  return counts


def train_wordpiece(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                    prefix: str = "##") -> list[str]:
  """A WordPiece vocabulary learnt by byte-pair-style merges, deterministically.

  The `tokenizers` trainer (0.23) is not deterministic: it numbers `##` pieces in hash-map
  order and breaks ties between equally frequent merges by those numbers, so two runs on the
  same texts give different token ids (huggingface/tokenizers#1794). This trainer breaks ties by
  the pieces' text instead.

  Returns:
    The special tokens, every character (as a word start and as a `##` continuation), then the
    merged pieces in the order they were learnt, until `vocab_size` or until no pair of pieces
    occurs `min_frequency` times.
  """
  words = sorted(word_counts)
  counts = [word_counts[w] for w in words]
  symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
  vocab = list(SPECIAL_TOKENS)
  known = set(vocab)
  for piece in sorted({s for syms in symbols for s in syms}):
    if piece not in known:
      vocab.append(piece)
      known.add(piece)

  pair_counts = collections.Counter()
  holders = collections.defaultdict(set)  # Pair -> words that (may) hold it.
  for i, syms in enumerate(symbols):
    for pair in zip(syms, syms[1:]):
      pair_counts[pair] += counts[i]
      holders[pair].add(i)
  heap = [(-c, pair) for pair, c in pair_counts.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    neg_count, pair = heapq.heappop(heap)
    count = pair_counts.get(pair, 0)
    if count != -neg_count:  # A stale entry: requeue with the current count.
      if count > 0:
        heapq.heappush(heap, (-count, pair))
      continue
    if count < min_frequency:
      break
    a, b = pair
    merged = a + b[len(prefix):]
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
    grown = set()
    for i in sorted(holders.pop(pair)):
      old = symbols[i]
      new, j = [], 0
      while j < len(old):
        if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
          new.append(merged)
          j += 2
        else:
          new.append(old[j])
          j += 1
      if len(new) == len(old):
        continue
      n = counts[i]
      for p in zip(old, old[1:]):
        pair_counts[p] -= n
      for p in zip(new, new[1:]):
        pair_counts[p] += n
        holders[p].add(i)
        grown.add(p)
      symbols[i] = new
    pair_counts.pop(pair, None)
    for p in sorted(grown):
      if pair_counts[p] > 0:
        heapq.heappush(heap, (-pair_counts[p], p))
  return vocab


def load_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
  """A fast BERT tokenizer from a local directory, without network access.

  With a `tokenizer.json` (a pretrained checkpoint's) the directory's own settings are used;
  with only `vocab.txt`, a lowercasing `BertTokenizerFast` over it.
  """
  directory = Path(directory)
  if (directory / "tokenizer.json").exists():
    return transformers.BertTokenizerFast.from_pretrained(os.fspath(directory),
                                                          local_files_only=True)
  vocab = directory / VOCAB_FILE
  if not vocab.exists():
    raise FileNotFoundError(f"{vocab} does not exist: build the tokenizer first, or point at a "
                            "directory holding vocab.txt.")
  # One token per line, its id the line number (the BERT vocab.txt format).
  tokens = vocab.read_text(encoding="utf-8").split("\n")
  if tokens and tokens[-1] == "":
    tokens.pop()
  return transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)},
                                        do_lower_case=True)


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# What BERT's normaliser does to ASCII text, besides lowercasing: drop control characters, and
# turn tab and line breaks into spaces (its "clean text" step).
_ASCII_CLEAN = {**_ASCII_CONTROL, **{ord(c): " " for c in "\t\n\r"}}


def _backend(tokenizer: transformers.PreTrainedTokenizerFast, max_len: int,
             ascii_only: bool = False):
  """A copy of the tokenizer's Rust backend set to truncate and pad to `max_len` (cached).

  A copy, so that the caller's tokenizer keeps its own settings; the backend is read-only while
  encoding, so threads may share it. `ascii_only`: the copy without its normaliser, for text
  normalised beforehand by `_normalise_ascii` (None when the normaliser is not a lowercasing,
  cleaning BERT normaliser, whose effect on ASCII that function reproduces).
  """
  per_len = _BACKENDS.setdefault(tokenizer, {})
  key = (max_len, ascii_only)
  if key not in per_len:
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    if ascii_only:
      from tokenizers import normalizers
      norm = backend.normalizer
      if not (isinstance(norm, normalizers.BertNormalizer) and norm.lowercase
              and norm.clean_text and norm.strip_accents in (None, True)):
        per_len[key] = None
        return None
      backend.normalizer = None
    backend.enable_truncation(max_len, strategy="longest_first")
    backend.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id,
                           pad_token=tokenizer.pad_token)
    per_len[key] = backend
  return per_len[key]


def _added_tokens(tokenizer: transformers.PreTrainedTokenizerFast) -> tuple[str, ...]:
  """The added (special) tokens' text, lowercased: text holding one is not pre-normalised,
  because the backend finds added tokens before normalising ("[SEP]" but not "[sep]")."""
  return tuple(sorted({t.content.lower() for t in
                       tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}))


def _normalise_ascii(text: str, added: tuple[str, ...]) -> str | None:
  """BERT's lowercasing normaliser on ASCII text (lowercase, controls dropped, tab/CR/LF ->
  space), or None when the text is not ASCII or holds an added token."""
  if not text.isascii():
    return None
  lower = text.lower()
  if any(a in lower for a in added):
    return None
  return lower.translate(_ASCII_CLEAN)


def encode_batch(tokenizer: transformers.PreTrainedTokenizerFast, titles: Sequence[str],
                 descriptions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes `[CLS] title [SEP] description [SEP]`, truncated longest-first and padded.

  Same ids as `tokenizer(titles, descriptions, truncation="longest_first",
  padding="max_length", max_length=max_len)`, but through the Rust backend without offsets,
  about twice as fast; and with a lowercasing BERT normaliser, ASCII pairs are normalised here
  (two C string calls) and encoded without it, which halves the rest (the normaliser was half
  of the encoding time). Other pairs go through the full backend.

  Returns:
    token_ids int32 [B, max_len] ([PAD] after the text) and token_mask int32 [B, max_len]
    (1 on real tokens).
  """
  if max_len < 3:
    raise ValueError(f"max_len={max_len} cannot hold [CLS] and two [SEP].")
  if len(titles) != len(descriptions):
    raise ValueError(f"{len(titles)} titles but {len(descriptions)} descriptions.")
  if len(titles) == 0:
    empty = np.zeros((0, max_len), np.int32)
    return empty, empty.copy()
  pairs = list(zip(titles, descriptions))
  fast = _backend(tokenizer, max_len, ascii_only=True)
  if fast is None:
    encodings = _backend(tokenizer, max_len).encode_batch_fast(pairs)
  else:
    added = _added_tokens(tokenizer)
    normalised = [(_normalise_ascii(t, added), _normalise_ascii(d, added)) for t, d in pairs]
    other_at = [i for i, (t, d) in enumerate(normalised) if t is None or d is None]
    if not other_at:
      encodings = fast.encode_batch_fast(normalised)
    else:
      other = set(other_at)
      ascii_at = [i for i in range(len(pairs)) if i not in other]
      encodings = [None] * len(pairs)
      if ascii_at:
        for i, e in zip(ascii_at, fast.encode_batch_fast([normalised[i] for i in ascii_at])):
          encodings[i] = e
      for i, e in zip(other_at, _backend(tokenizer, max_len).encode_batch_fast(
          [pairs[i] for i in other_at])):
        encodings[i] = e
  ids = np.array([e.ids for e in encodings], dtype=np.int32)
  mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
  return ids, mask
