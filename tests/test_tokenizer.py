"""The WordPiece tokenizer: training, reuse, offline loading and fixed-length encoding."""
import numpy as np
import pytest

from mtl_jax import tokenizer as tk

WORDS = ("leather ankle boots suede heel zip winter waterproof garden rubber pan frying skillet "
         "nonstick kettle electric boil water duvet pillow memory foam soft warm cotton").split()


def texts(n=400, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, rng.integers(5, 15))).capitalize() + "." for _ in range(n)]


@pytest.fixture
def tokenizer(tmp_path):
  return tk.build_tokenizer(texts(), tmp_path / "tok", vocab_size=200)


def test_vocabulary_and_special_tokens(tmp_path, tokenizer):
  vocab = (tmp_path / "tok" / "vocab.txt").read_text().splitlines()
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert len(vocab) <= 200 and len(set(vocab)) == len(vocab)
  assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
          tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
  # Lowercased whole words of the training texts are single tokens.
  assert tokenizer.tokenize("Leather KETTLE") == ["leather", "kettle"]


def test_existing_vocabulary_is_reused(tmp_path, tokenizer):
  path = tmp_path / "tok" / "vocab.txt"
  before = path.read_bytes(), path.stat().st_mtime_ns
  again = tk.build_tokenizer(iter(["completely different words"]), tmp_path / "tok", 50)
  assert (path.read_bytes(), path.stat().st_mtime_ns) == before
  assert again.get_vocab() == tokenizer.get_vocab()


def test_same_texts_same_vocabulary(tmp_path, tokenizer):
  other = tk.build_tokenizer(texts(), tmp_path / "tok2", vocab_size=200)
  assert other.get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_offline(tmp_path, tokenizer):
  loaded = tk.load_tokenizer(tmp_path / "tok")
  sample = texts(20, seed=1)
  a = tk.encode_batch(tokenizer, sample, sample[::-1], 24)
  b = tk.encode_batch(loaded, sample, sample[::-1], 24)
  np.testing.assert_array_equal(a[0], b[0])
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    tk.load_tokenizer(tmp_path / "nothing")


def test_encode_batch_layout(tokenizer):
  ids, mask = tk.encode_batch(tokenizer, ["Leather boots", "Kettle"], ["Soft suede heel", ""], 10)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 10)
  tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
  assert tokens == ["[CLS]", "leather", "boots", "[SEP]", "soft", "suede", "heel", "[SEP]",
                    "[PAD]", "[PAD]"]
  assert tokenizer.convert_ids_to_tokens(ids[1, :3].tolist()) == ["[CLS]", "kettle", "[SEP]"]
  assert ids[1, 3] == 3  # Empty description: [CLS] title [SEP] [SEP].
  np.testing.assert_array_equal(mask, [[1] * 8 + [0] * 2, [1] * 4 + [0] * 6])
  np.testing.assert_array_equal(ids[mask == 0], 0)


def test_encode_batch_truncates_longest_first(tokenizer):
  long = " ".join(["water"] * 40)
  ids, mask = tk.encode_batch(tokenizer, ["Leather boots"], [long], 12)
  assert mask.sum() == 12
  tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
  # The short title survives; the long description is cut.
  assert tokens[:4] == ["[CLS]", "leather", "boots", "[SEP]"] and tokens[-1] == "[SEP]"
  ids, _ = tk.encode_batch(tokenizer, [long], [long], 12)
  # Both halves trimmed, to 4 and 5 of the 9 free places.
  assert np.flatnonzero(ids[0] == 3).tolist() in ([5, 11], [6, 11])
  empty_ids, empty_mask = tk.encode_batch(tokenizer, [], [], 12)
  assert empty_ids.shape == (0, 12) and empty_mask.shape == (0, 12)
  with pytest.raises(ValueError):
    tk.encode_batch(tokenizer, ["a"], ["b"], 2)


class _FakeSource:
  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


class _FakeCatalogue:
  def __init__(self, records):
    self.sources = {"train": _FakeSource(records)}


def test_build_from_catalogue_samples_the_train_split(tmp_path):
  records = [{"title": t, "description": d} for t, d in zip(texts(300), texts(300, seed=2))]
  seen = list(tk.catalogue_texts(_FakeCatalogue(records), max_texts=50))
  assert len(seen) == 50 and len(set(seen)) == 50
  tok = tk.build_tokenizer(_FakeCatalogue(records), tmp_path / "tok", 150)
  assert "boots" in tok.get_vocab()


def test_encode_batch_matches_the_transformers_call(tokenizer):
  titles, descriptions = texts(50, seed=3), texts(50, seed=4)
  ids, mask = tk.encode_batch(tokenizer, titles, descriptions, 16)
  # The caller's tokenizer keeps its own (absent) truncation settings.
  assert tokenizer.backend_tokenizer.truncation is None
  ref = tokenizer(titles, descriptions, max_length=16, truncation="longest_first",
                  padding="max_length")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_count_words_matches_bert_pre_tokenisation():
  from tokenizers import normalizers, pre_tokenizers
  sample = ["Caf\u00e9 na\u00efve \u00a9 2024 a_b x-y $5 \u201cquoted\u201d don't",
            "Plain ASCII: Boots, SHOES & more\x01!", "tab\there"]
  norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  for text in sample:
    want = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
    assert tk.count_words([text]) == tk.collections.Counter(want), text


TRICKY = ["Leather BOOTS", "tab\there", "line\nbreak\r\nend", "ctl\x00\x01\x0b\x0c\x1f\x7fchars",
          "Has [SEP] inside", "lower [sep] and [Cls] and [MASK]", "[PAD][UNK]", "", "   ",
          "caf\u00e9 na\u00efve", "\u4e2d\u6587 kettle", "emoji \U0001F600 boots", "x" * 300,
          "Punct: a_b, x-y $5 (boots)!", "\u00a0nbsp\u2028sep", "KETTLE\tBOIL\x0bWATER"]


@pytest.mark.parametrize("max_len", [6, 24])
def test_encode_batch_ascii_fast_path_matches_the_full_normaliser(tokenizer, max_len):
  """ASCII pairs skip the backend's normaliser (normalised in Python): same ids as the full path,
  for mixed batches, control characters, case and literal special tokens."""
  rng = np.random.default_rng(0)
  titles = TRICKY + [TRICKY[i] for i in rng.integers(0, len(TRICKY), 40)] + texts(20, seed=5)
  descriptions = TRICKY[::-1] + [TRICKY[i] for i in rng.integers(0, len(TRICKY), 40)] + texts(
      20, seed=6)
  ids, mask = tk.encode_batch(tokenizer, titles, descriptions, max_len)
  ref = tokenizer(titles, descriptions, max_length=max_len, truncation="longest_first",
                  padding="max_length")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  ascii_only = [i for i, (t, d) in enumerate(zip(titles, descriptions))
                if t.isascii() and d.isascii()]
  ids, _ = tk.encode_batch(tokenizer, [titles[i] for i in ascii_only],
                           [descriptions[i] for i in ascii_only], max_len)
  np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"])[ascii_only])


def test_encode_batch_uses_the_full_normaliser_when_it_is_not_bert_lowercase(tmp_path, tokenizer):
  cased = tk.transformers.BertTokenizerFast(vocab=tokenizer.get_vocab(), do_lower_case=False)
  assert tk._backend(cased, 16, ascii_only=True) is None
  ids, _ = tk.encode_batch(cased, ["Leather BOOTS"], ["kettle"], 16)
  ref = cased(["Leather BOOTS"], ["kettle"], max_length=16, truncation="longest_first",
              padding="max_length")
  np.testing.assert_array_equal(ids, ref["input_ids"])
