"""The classical baseline of the text family: character n-gram TF-IDF + logistic regression (scikit-learn), kept as
arrays so that it is a plain torch state dict in the registry (no pickle) and serves like any other model.

`fit_tfidf_lr` fits scikit-learn's `TfidfVectorizer(analyzer="char")` and `LogisticRegression` on the training
texts and picks C on the validation texts (accuracy). `TfidfLR` holds the result:
    vocabulary     list of V n-grams (constructor argument, stored in the version's meta.json)
    idf            (V,)   buffer
    coef           (K, V) parameter, K = 1 for two classes (scikit-learn's binary form), else K = C
    intercept      (K,)   parameter
    forward(x)     (B, V) TF-IDF rows (sparse or dense) -> (B, C) class logits (for K = 1: [0, z])
The features come from `ecomray.features.text.tfidf_vectorizer(model.vocabulary, *model.ngram, model.sublinear_tf,
idf=model.idf)` and `tfidf_matrix`: texts normalized like the tokenizer does (NFKC, whitespace removed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ecomray.features.text import tfidf_vectorizer


class TfidfLR(nn.Module):
    def __init__(self, vocabulary: list[str], num_classes: int = 2, ngram_min: int = 1, ngram_max: int = 3,
                 sublinear_tf: bool = True, **fit_options: Any) -> None:
        """`fit_options` (Cs, min_df, max_features, max_iter) are used by `fit_tfidf_lr` only."""
        super().__init__()
        V, K = len(vocabulary), (1 if num_classes == 2 else num_classes)
        self.vocabulary, self.num_classes = list(vocabulary), num_classes
        self.ngram = (ngram_min, ngram_max)
        self.sublinear_tf = sublinear_tf
        self.register_buffer("idf", torch.ones(V))
        self.coef = nn.Parameter(torch.zeros(K, V))
        self.intercept = nn.Parameter(torch.zeros(K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V) (sparse or dense) -> (B, C) logits."""
        z = (x @ self.coef.T) + self.intercept                                  # (B, K)
        return torch.cat([torch.zeros_like(z), z], dim=1) if z.shape[1] == 1 else z


def fit_tfidf_lr(train_texts: list[str], y_train: np.ndarray, val_texts: list[str], y_val: np.ndarray,
                 num_classes: int = 2, ngram_min: int = 1, ngram_max: int = 3, sublinear_tf: bool = True,
                 min_df: int = 2, max_features: int | None = 300_000, Cs: list[float] | None = None,
                 max_iter: int = 2000, **_: Any) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """Fit on train, choose C by validation accuracy. Returns (constructor kwargs, state dict, report)."""
    from sklearn.linear_model import LogisticRegression

    vec = tfidf_vectorizer(None, ngram_min, ngram_max, sublinear_tf, min_df=min_df, max_features=max_features)
    Xtr = vec.fit_transform(list(train_texts))
    Xva = vec.transform(list(val_texts))
    scores, best = {}, None
    for C in (Cs or [1.0, 3.0, 10.0, 30.0]):
        lr = LogisticRegression(C=float(C), max_iter=max_iter, solver="liblinear" if num_classes == 2 else "lbfgs")
        lr.fit(Xtr, y_train)
        acc = float((lr.predict(Xva) == y_val).mean())
        scores[str(C)] = acc
        if best is None or acc > best[0]:
            best = (acc, float(C), lr)
    _, C, lr = best
    vocab = [None] * len(vec.vocabulary_)
    for t, i in vec.vocabulary_.items():
        vocab[i] = t
    kwargs = {"vocabulary": vocab, "num_classes": num_classes, "ngram_min": ngram_min, "ngram_max": ngram_max,
              "sublinear_tf": sublinear_tf}
    state = {"idf": torch.from_numpy(vec.idf_.astype(np.float32)),
             "coef": torch.from_numpy(lr.coef_.astype(np.float32)),
             "intercept": torch.from_numpy(lr.intercept_.astype(np.float32))}
    return kwargs, state, {"C": C, "val_accuracy_by_C": scores, "features": len(vocab)}
