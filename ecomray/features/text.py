"""Text features for the review family: the normalization key used by the leakage guard, and a character-level
tokenizer built with Hugging Face `tokenizers`.

- `NOT_BLANK`, `is_blank(s)` / `blank_expr(col)`: what counts as a text that says nothing (whitespace, control
  characters, zero-width spaces and joiners only), one rule for prepare's quarantine, batch scoring, reports and
  the serving schemas.
- `text_key(s)` / `text_key_expr(col)`: NFKC, then every whitespace character removed. Two reviews with the same key
  are "the same text" for deduplication and for the leakage guard (Python and Polars give the same key).
- `fit_tokenizer(texts)`: a WordLevel model over single characters (NFKC-normalized, whitespace dropped), fitted
  on training texts only, with the special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. It is stored in the
  registry version as `Tokenizer.to_str()` JSON and rebuilt by `load_tokenizer` for serving.
- `encode(tok, texts, max_len)`: ids (N, max_len) int64 padded with 0 and the true lengths; sequences start with
  [CLS] and are cut to `max_len` tokens (that is `max_len - 1` characters).
- `tfidf_vectorizer(...)` / `tfidf_matrix(vec, texts)`: scikit-learn's character n-gram TF-IDF over `text_key`-
  normalized texts, fitted (vocabulary and idf free) or rebuilt from stored arrays (the TF-IDF model's vocabulary
  and idf), as a (N, V) sparse CSR float32 tensor.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import polars as pl
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)


# "Has a non-blank character", as a pattern every engine reads alike: the OpenAPI contract's regexes are ECMA-262,
# the server's and Polars' are Rust's (pydantic-core) and test generators' Python's, and their `\s` differ (U+0085
# and U+001C-001F are whitespace to some, U+FEFF to another). Excluding the union keeps the contract exactly true.
# Control characters (NUL...) and the zero-width space, joiners and word joiner show nothing either: a text of only
# those was classified (or copy written for it) as if it said something.
NOT_BLANK = r"[^\s\x00-\x1f\x7f\x85\u200b-\u200d\u2060\ufeff]"
_NOT_BLANK = re.compile(NOT_BLANK)


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace, control characters and zero-width characters (or nothing)."""
    return _NOT_BLANK.search(text) is None


def blank_expr(col: str | pl.Expr) -> pl.Expr:
    """`is_blank` as a Polars expression (null stays null)."""
    e = pl.col(col) if isinstance(col, str) else col
    return ~e.str.contains(NOT_BLANK)


def text_key(text: str) -> str:
    """The comparison key of a text: NFKC, all whitespace removed."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def text_key_expr(col: str | pl.Expr) -> pl.Expr:
    """`text_key` as a Polars expression."""
    e = pl.col(col) if isinstance(col, str) else col
    return e.str.normalize("NFKC").str.replace_all(r"\s+", "")


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), "")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one token per character
    tok.decoder = decoders.Fuse()                                                # characters joined back, no spaces
    return tok


def fit_tokenizer(texts: list[str], vocab_size: int = 6000, min_frequency: int = 2) -> Tokenizer:
    """Fit the character vocabulary on `texts` (the training split only): the most frequent characters."""
    tok = _empty_tokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(MASK) == MASK_ID
    return tok


def load_tokenizer(json_str: str) -> Tokenizer:
    return Tokenizer.from_str(json_str)


def encode(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (N, max_len) int64 with [CLS] first and [PAD]=0 after the text; lengths (N,) in tokens (>= 1)."""
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    ids = np.zeros((len(encs), max_len), dtype=np.int64)
    lengths = np.zeros(len(encs), dtype=np.int64)
    for i, e in enumerate(encs):
        row = [CLS_ID, *e.ids[: max_len - 1]]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def tfidf_vectorizer(vocabulary: list[str] | None, ngram_min: int = 1, ngram_max: int = 3, sublinear_tf: bool = True,
                     idf: np.ndarray | None = None, min_df: int = 1, max_features: int | None = None):
    """A `TfidfVectorizer(analyzer="char")`: unfitted when `vocabulary` is None, else rebuilt from vocabulary + idf."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char", ngram_range=(ngram_min, ngram_max), preprocessor=text_key, lowercase=False,
                          sublinear_tf=sublinear_tf, min_df=min_df, max_features=max_features, dtype=np.float32,
                          vocabulary={t: i for i, t in enumerate(vocabulary)} if vocabulary is not None else None)
    if idf is not None:
        vec.idf_ = np.asarray(idf, dtype=np.float64)
    return vec


def tfidf_matrix(vec, texts: list[str]):
    """(N,) texts -> (N, V) sparse CSR float32 torch tensor of l2-normalized TF-IDF rows."""
    import warnings

    import torch

    X = vec.transform(list(texts)).astype(np.float32).tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta": only a matmul is used
        return torch.sparse_csr_tensor(torch.from_numpy(X.indptr.astype(np.int64)),
                                       torch.from_numpy(X.indices.astype(np.int64)), torch.from_numpy(X.data),
                                       size=X.shape)
