"""Review sentiment: a text classifier over a prepared `reviews` dataset (ecomray/data/adapters/chnsenticorp.py,
online_shopping.py, synthetic_reviews.py), on the one training loop.

Models (`model=`): `text_transformer` (ecomray/models/text_encoder.py, from scratch, optionally initialized from
an MLM pretraining version: `model.init_from=<registry name>[:<version|alias>]`), `tfidf_lr` (character n-gram
TF-IDF + logistic regression, fitted by scikit-learn in `build_model`, C chosen on val; the loop then runs no
steps) and `hf_encoder` (a Hugging Face encoder from a local directory, ecomray/models/hf_classifier.py).

Data: the dataset's own train/val/test split, plus the train split of every dataset in `task.extra_train` (for
example online_shopping's leak-free train split for a model scored on ChnSentiCorp). The leakage guard
(`task.eval_text_guard`, see `training_frame`) drops extra training rows whose normalized text (NFKC, whitespace
removed) equals a val or test text; `strict` drops them from the dataset's own train split too (ChnSentiCorp's
canonical train holds 332 of its test texts; `published`, the default, keeps that split as published so that
results compare with published figures). Counts go to the metadata, and every metric dict carries
`unseen_accuracy`: accuracy on the eval rows whose text is not a training text. The character tokenizer is fitted
on guarded training texts only, or taken from the `init_from` version.

Metrics (scikit-learn): accuracy, macro-F1 and CE loss; confusion matrices and per-category accuracy / macro-F1
are kept in the version's meta.json (`confusion`, `per_category`).

`predict(model, meta, texts)` -> [{"label", "probs"}]: a text longer than `meta["max_chars"]` characters is
truncated to its first `max_chars` characters (the model never saw more); an empty or whitespace-only text raises
ValueError.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pydantic import BaseModel, Field, StringConstraints
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn

from ecomray import serving
from ecomray.data import shards
from ecomray.features.text import encode as encode_chars
from ecomray.features.text import (fit_tokenizer, is_blank, load_tokenizer, text_key_expr, tfidf_matrix,
                                   tfidf_vectorizer)
from ecomray.inference import init_version
from ecomray.runtime import UserError
from ecomray.tasks import RequestError

KEY_METRICS = ("accuracy", "macro_f1")
ROUTE = "sentiment"


# ----------------------------------------------------------------------------------------------- reading
def read_reviews(cfg: dict, name: str) -> pl.DataFrame:
    """A prepared reviews dataset as one frame in source order, with its `split` column."""
    folder = shards.dataset_dir(cfg, name)
    df = shards.read_frame(cfg, name)
    if "text" not in df.columns or "label" not in df.columns:
        raise UserError(f"{folder}: not a reviews dataset (needs text and label columns; prepare it with schema=reviews)")
    return df.with_columns(pl.lit(name).alias("_dataset"))


def training_frame(cfg: dict) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], dict[str, int]]:
    """(train rows, {"val", "test"} rows, counts) with the leakage guard applied to the training rows.

    `task.eval_text_guard`: `published` (default) drops every `extra_train` row whose normalized text equals a val/test
    text and keeps the scored dataset's own train split exactly as published (ChnSentiCorp's canonical train holds
    332 of its test texts: the published figures include them); `strict` drops such rows from the own train too.
    The tokenizer is always fitted on the rows left after the strict guard (`tokenizer_rows`)."""
    t = cfg["task"]
    guard = str(t.get("eval_text_guard", "published"))
    if guard not in ("published", "strict"):
        raise UserError(f"task.eval_text_guard={guard!r}: use published or strict")
    main = read_reviews(cfg, cfg["dataset"]["name"])
    evals = {s: main.filter(pl.col("split") == s) for s in ("val", "test")}
    parts = [main.filter(pl.col("split") == "train")]
    for extra in t.get("extra_train") or []:
        parts.append(read_reviews(cfg, extra).filter(pl.col("split") == "train"))
    cols = ["text", "label", "category", "_dataset"]
    train = pl.concat([p.select([c for c in cols if c in p.columns]) for p in parts], how="diagonal_relaxed")
    keys = pl.concat([e.select(text_key_expr("text").alias("k")) for e in evals.values()])["k"]
    leak = text_key_expr("text").is_in(keys.implode())
    own = pl.col("_dataset") == cfg["dataset"]["name"]
    counts: dict[str, Any] = {"eval_text_guard": guard, "train_rows_before_guard": train.height,
                              "own_train_rows_equal_to_eval_text": int(train.select((leak & own).sum()).item()),
                              "extra_train_rows_equal_to_eval_text_dropped": int(train.select((leak & ~own).sum()).item())}
    train = train.with_columns(_leak=leak).filter(~pl.col("_leak") | (own if guard == "published" else pl.lit(False)))
    counts["train_rows"] = train.height
    counts["by_dataset"] = {k: int(v) for k, v in train.group_by("_dataset").len().iter_rows()}
    return train, evals, counts


# ----------------------------------------------------------------------------------------------- data
@dataclass
class TextData:
    labels: list[str]                     # class names, index = class id
    raw_labels: list[str]                 # raw label values in the data, same order
    texts: dict[str, list[str]]
    y: dict[str, np.ndarray]
    category: dict[str, list[str] | None]
    tok_kind: str                         # "char", "hf" or "none" (TF-IDF)
    tok_json: str | None
    max_chars: int
    max_len: int
    ids: dict[str, np.ndarray] = field(default_factory=dict)         # split -> (N, max_len) int64
    lengths: dict[str, np.ndarray] = field(default_factory=dict)     # split -> (N,)
    counts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    fit_report: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, np.ndarray] = field(default_factory=dict)        # split -> rows whose text is also a training text
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    per_category: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cfg: dict = field(repr=False, default_factory=dict)


def model_kind(cfg: dict) -> str:
    target = cfg["model"].get("_target_", "")
    return "tfidf" if target.endswith("TfidfLR") else "hf" if target.endswith("HFClassifier") else "transformer"


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> TextData:
    t = cfg["task"]
    set_threads(cfg)
    train, evals, counts = training_frame(cfg)
    names = (cfg["dataset"].get("label_names")
             or shards.load_manifest(shards.dataset_dir(cfg)).get("label_names") or {})
    raw = sorted(set(train["label"].unique().to_list()) | set(names))
    labels = [str(names.get(r, r)) for r in raw]
    index = {r: i for i, r in enumerate(raw)}
    frames = {"train": train, **evals}
    texts = {s: f["text"].to_list() for s, f in frames.items()}
    clean_train = train.filter(~pl.col("_leak"))["text"].to_list()   # tokenizer fit: never an eval text
    train_keys = set(train.select(text_key_expr("text")).to_series().to_list())
    seen = {s: np.array([k in train_keys for k in f.select(text_key_expr("text")).to_series().to_list()], dtype=bool)
            for s, f in evals.items()}
    y = {s: np.array([index[v] for v in f["label"].to_list()], dtype=np.int64) for s, f in frames.items()}
    category = {s: (f["category"].to_list() if "category" in f.columns and f["category"].null_count() < f.height else None)
                for s, f in frames.items()}
    max_chars = int(t.get("max_chars", 160))
    kind = model_kind(cfg)
    tok_json, tok_kind, max_len = None, "none", max_chars + 1
    if kind == "hf":
        from transformers import AutoTokenizer

        d = cfg["model"].get("pretrained_dir")
        if not d or not os.path.isdir(str(d)):
            raise UserError(f"model.pretrained_dir={d!r} is not a local directory (nothing is downloaded)")
        hf_tok = AutoTokenizer.from_pretrained(d, local_files_only=True, use_fast=True)
        if hf_tok.pad_token_id is None:
            raise UserError(f"model.pretrained_dir={d}: its tokenizer has no padding token (pad_token in "
                            f"tokenizer_config.json / special_tokens_map.json)")
        backend = hf_tok.backend_tokenizer
        # the padding token travels in the stored tokenizer: not every vocabulary calls it [PAD] (RoBERTa's is
        # <pad>, id 1; id 0, assumed before, is its <s>, which padding masks then hid from attention)
        backend.enable_padding(pad_id=int(hf_tok.pad_token_id), pad_token=str(hf_tok.pad_token))
        tok_json, tok_kind, max_len = backend.to_str(), "hf", max_chars + 2
    elif kind == "transformer":
        init = init_version(cfg)
        if init is not None:
            tok_json = init["meta"]["tokenizer"]
            counts["tokenizer_from"] = f"{init['meta'].get('registry_name', cfg['model']['init_from'])}:{init['version']}"
        else:
            tk = t.get("tokenizer") or {}
            tok_json = fit_tokenizer(clean_train, int(tk.get("vocab_size", 6000)), int(tk.get("min_frequency", 2))).to_str()
        tok_kind = "char"
    counts["eval_rows_whose_text_is_in_train"] = {s: int(m.sum()) for s, m in seen.items()}
    data = TextData(labels, raw, texts, y, category, tok_kind, tok_json, max_chars, max_len, counts=counts,
                    rank=rank, world=world_size, seen=seen, cfg=cfg)
    if tok_kind != "none":
        for s in texts:
            data.ids[s], data.lengths[s] = encode_texts(tok_kind, tok_json, max_len, [x[:max_chars] for x in texts[s]])
    return data


@functools.lru_cache(maxsize=8)
def _tokenizer(kind: str, tok_json: str, max_len: int):
    tok = load_tokenizer(tok_json)
    if kind == "hf":
        tok.enable_truncation(max_length=max_len)
        tok.no_padding()
    return tok


@functools.lru_cache(maxsize=8)
def hf_pad_id(tok_json: str) -> int:
    """The padding id a stored Hugging Face tokenizer names (versions stored before it did: [PAD]'s, else 0)."""
    padding = json.loads(tok_json).get("padding") or {}
    if padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    return int(load_tokenizer(tok_json).token_to_id("[PAD]") or 0)


def encode_texts(kind: str, tok_json: str, max_len: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids (N, max_len), lengths (N,)) with the stored tokenizer."""
    tok = _tokenizer(kind, tok_json, max_len)
    if kind == "char":
        return encode_chars(tok, texts, max_len)
    encs = tok.encode_batch(list(texts), add_special_tokens=True)
    pad = hf_pad_id(tok_json)
    ids = np.full((len(encs), max_len), pad, dtype=np.int64)
    lengths = np.zeros(len(encs), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        lengths[i] = len(e.ids)
    return ids, lengths


# ----------------------------------------------------------------------------------------------- model
def build_model(cfg: dict, data: TextData) -> nn.Module:
    kind = model_kind(cfg)
    mcfg = dict(cfg["model"])
    if kind == "tfidf":
        from ecomray.models.tfidf_lr import TfidfLR, fit_tfidf_lr

        if not data.model_kwargs:   # fit once per data object (the driver rebuilds both after training)
            opts = {k: v for k, v in mcfg.items() if k != "_target_"}
            # cut as evaluation and serving cut them (fitted on whole texts, it scored cut ones: a train/serve skew)
            train, val = ([x[: data.max_chars] for x in data.texts[s]] for s in ("train", "val"))
            kwargs, state, report = fit_tfidf_lr(train, data.y["train"], val, data.y["val"],
                                                 num_classes=len(data.labels), **opts)
            data.model_kwargs, data.fit_report, data._tfidf_state = kwargs, report, state
        model = TfidfLR(**data.model_kwargs)
        model.load_state_dict(data._tfidf_state)
        return model
    if kind == "hf":
        data.model_kwargs = {"num_classes": len(data.labels), "pad_id": hf_pad_id(data.tok_json)}
        model = instantiate(mcfg, **data.model_kwargs)
        data.model_kwargs["hf_config"] = model.encoder.config.to_dict()
        return model
    vocab = _tokenizer("char", data.tok_json, data.max_len).get_vocab_size()
    data.model_kwargs = {"vocab_size": vocab, "num_classes": len(data.labels), "max_len": data.max_len}
    model = instantiate(mcfg, **data.model_kwargs)
    init = init_version(cfg)
    if init is not None:
        state = init["state_dict"]
        mine = model.state_dict()
        state = dict(state)
        if "pos.weight" in state and state["pos.weight"].shape[0] < mine["pos.weight"].shape[0]:
            # pretrained on shorter texts: its positions fill the first rows, the rest keep their initialization
            pos = mine["pos.weight"].clone()
            pos[: state["pos.weight"].shape[0]] = state["pos.weight"]
            state["pos.weight"] = pos
        bad = [k for k, v in state.items() if k in mine and tuple(v.shape) != tuple(mine[k].shape)]
        if bad:
            raise UserError(f"model.init_from={cfg['model']['init_from']}: shapes differ for {bad[:3]} "
                            f"(use the pretraining run's model settings)")
        keep = {k: v for k, v in state.items() if k in mine and not k.startswith("head.")}
        model.load_state_dict(keep, strict=False)
        print(f"[sentiment] initialized {len(keep)} tensors from {cfg['model']['init_from']} ({init['version']})", flush=True)
    return model


def load_model(found: dict) -> nn.Module:
    """Serving: rebuild any model of this family from a registry version (`registry.load` output)."""
    from hydra.utils import get_class

    mcfg = dict(found["config"]["model"])
    cls = get_class(mcfg.pop("_target_"))
    # The class is called directly, not through hydra's instantiate: a TF-IDF vocabulary holds n-grams such as
    # "???" or "${" that OmegaConf would read as missing values or interpolations.
    kwargs = {k: v for k, v in mcfg.items() if k not in ("init_from", "pretrained_dir")}
    model = cls(**{**kwargs, **found["meta"]["model_kwargs"]})
    model.load_state_dict(found["state_dict"])
    return model


# ----------------------------------------------------------------------------------------------- training
def _length_batches(lengths: np.ndarray, idx: np.ndarray, batch_size: int, g: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort within chunks of 50 batches by length (less padding), shuffle the batches."""
    idx = idx[g.permutation(len(idx))]
    out = []
    chunk = batch_size * 50
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [out[i] for i in g.permutation(len(out))]


def epoch_part(idx: np.ndarray, epoch: int, seed: int, fraction: float) -> tuple[np.ndarray, np.random.Generator]:
    """The rows of `idx` that loop epoch `epoch` trains on: with `fraction` = 1/k a pass over the data is split into k
    loop epochs (so validation, checkpoints and early stopping happen k times per pass). Pure in (epoch, seed)."""
    k = max(1, int(round(1.0 / float(fraction or 1.0))))
    perm = idx[np.random.default_rng(seed * 100_003 + epoch // k).permutation(len(idx))]
    return np.array_split(perm, k)[epoch % k], np.random.default_rng(seed * 100_003 + epoch)


def set_threads(cfg: dict) -> None:
    """`task.num_threads`: torch intra-op threads for this process (1 avoids OpenMP spin-waiting on a shared,
    oversubscribed CPU; null leaves torch's default)."""
    n = cfg["task"].get("num_threads")
    if n:
        torch.set_num_threads(int(n))


def train_batches(data: TextData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    if data.tok_kind == "none":
        return  # the TF-IDF model is fitted in build_model: no gradient steps
    n = len(data.y["train"])
    mine, g = epoch_part(np.arange(data.rank, n, data.world), epoch, seed, data.cfg["task"].get("epoch_fraction", 1.0))
    ids, lengths = data.ids["train"], data.lengths["train"]
    for b in _length_batches(lengths, mine, batch_size, g):
        L = int(lengths[b].max())
        yield {"ids": torch.from_numpy(ids[b, :L]), "label": torch.from_numpy(data.y["train"][b])}


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["ids"]), batch["label"])


@torch.no_grad()
def probabilities(model: nn.Module, data: TextData, split: str, batch_size: int = 256) -> np.ndarray:
    """(N, C) class probabilities for a split."""
    if data.tok_kind == "none":
        return _probs_texts(model, [x[: data.max_chars] for x in data.texts[split]])
    return _probs_ids(model, data.ids[split], data.lengths[split], batch_size)


@torch.no_grad()
def _probs_ids(model: nn.Module, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256) -> np.ndarray:
    was = model.training
    if was:  # eval()/train() walk every submodule: skipped when the mode is already right (serving)
        model.eval()
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(ids), 0), dtype=np.float32)
    parts = []
    for lo in range(0, len(order), batch_size):
        b = order[lo:lo + batch_size]
        L = int(lengths[b].max())
        parts.append((b, torch.softmax(model(torch.from_numpy(ids[b, :L])).float(), -1).numpy()))
    if was:
        model.train()
    if parts:
        out = np.zeros((len(ids), parts[0][1].shape[1]), dtype=np.float32)
        for b, p in parts:
            out[b] = p
    return out


_VECTORIZERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _probs_texts(model: nn.Module, texts: list[str]) -> np.ndarray:
    """TF-IDF model: features from its stored vocabulary and idf (the vectorizer is built once per model)."""
    vec = _VECTORIZERS.get(model)
    if vec is None or getattr(vec, "_idf_version", None) is not model.idf._version:
        vec = tfidf_vectorizer(model.vocabulary, *model.ngram, model.sublinear_tf, idf=model.idf.numpy())
        vec._idf_version = model.idf._version
        _VECTORIZERS[model] = vec
    with torch.no_grad():
        return torch.softmax(model(tfidf_matrix(vec, texts)).float(), -1).numpy()


def scores(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict[str, float]:
    pred = p.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
            "loss": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-9, 1.0)).mean())}


EVAL_OPTIONS = ("eval_batch_size",)     # evaluate.task: the rest build the training rows or the tokenizer


def evaluate(model: nn.Module, data: TextData, split: str) -> dict[str, float]:
    if split not in data.texts:
        raise UserError(f"no split {split!r} (have {sorted(data.texts)})")
    y = data.y[split]
    p = probabilities(model, data, split, int(data.cfg.get("task", {}).get("eval_batch_size", 256)))
    out = scores(y, p, len(data.labels))
    seen = data.seen.get(split)
    if seen is not None and seen.any():   # the rows a model could have memorized, and the rest
        out["unseen_accuracy"] = float(accuracy_score(y[~seen], p[~seen].argmax(1))) if (~seen).any() else float("nan")
    data.confusion[split] = confusion_matrix(y, p.argmax(1), labels=list(range(len(data.labels)))).tolist()
    if data.category.get(split):
        cats = np.array(data.category[split])
        data.per_category[split] = {c: {**scores(y[cats == c], p[cats == c], len(data.labels)), "n": int((cats == c).sum())}
                                    for c in sorted(set(cats.tolist()))}
    return out


def metadata(data: TextData) -> dict:
    return {"labels": data.labels, "raw_labels": data.raw_labels, "tokenizer": data.tok_json,
            "tokenizer_kind": data.tok_kind, "max_chars": data.max_chars, "max_len": data.max_len,
            "model_kwargs": data.model_kwargs, "counts": data.counts, "fit": data.fit_report,
            "confusion": data.confusion, "per_category": data.per_category,
            "confusion_note": "rows = true label, columns = predicted, in `labels` order",
            "train_datasets": [data.cfg["dataset"]["name"], *(data.cfg["task"].get("extra_train") or [])],
            "examples": [{"texts": [t[:80] for t in data.texts["train"][:3] if not is_blank(t[:80])]}] if data.texts["train"] else []}


# ----------------------------------------------------------------------------------------------- predicting
def predict(model: nn.Module, meta: dict, texts: list[str]) -> list[dict]:
    """[{"label": name, "probs": {name: p}}] per text. Texts over meta["max_chars"] characters are cut to their first
    max_chars characters; an empty (or whitespace-only) text raises ValueError."""
    texts = list(texts)
    for i, x in enumerate(texts):
        if not isinstance(x, str) or is_blank(x):
            raise ValueError(f"text {i} is empty or blank (or not a string)")
    cut = [x[: int(meta["max_chars"])] for x in texts]
    if meta.get("tokenizer_kind", "char") == "none":
        p = _probs_texts(model, cut)
    else:
        ids, lengths = encode_texts(meta["tokenizer_kind"], meta["tokenizer"], int(meta["max_len"]), cut)
        p = _probs_ids(model, ids, lengths)
    labels = meta["labels"]
    return [{"label": labels[int(row.argmax())], "probs": {lab: float(row[k]) for k, lab in enumerate(labels)}} for row in p]


def batch_inputs(cfg: dict, split: str) -> shards.ShardScan:
    """The prepared review rows (prepare's `split` column selects train / val / test, or all)."""
    return shards.scan(cfg, split)


BATCH_OPTIONS: tuple[str, ...] = ()     # batch_score takes no options


def batch_score(model: nn.Module, meta: dict, batch: pa.Table, options: dict) -> pa.Table:
    """`predicted` label and its probability per review; rows with an empty text get nulls."""
    texts = batch["text"].to_pylist()
    ok = [n for n, t in enumerate(texts) if isinstance(t, str) and not is_blank(t)]
    res = predict(model, meta, [texts[n] for n in ok]) if ok else []
    label: list[Any] = [None] * len(texts)
    prob: list[Any] = [None] * len(texts)
    for n, r in zip(ok, res):
        label[n], prob[n] = r["label"], r["probs"][r["label"]]
    return pa.table({"predicted": pa.array(label, pa.string()), "probability": pa.array(prob, pa.float32())})


# ----------------------------------------------------------------------------------------------- serving
class SentimentResult(BaseModel):
    label: str
    probs: dict[str, float]


class SentimentResponse(serving.Response):
    results: list[SentimentResult]


def api(meta: dict, limits: dict) -> tuple[type[BaseModel], type[BaseModel]]:
    """POST /v1/sentiment: at most `limits.max_texts` texts of 1 to `limits.max_chars` characters, not blank."""
    Text = Annotated[str, StringConstraints(min_length=1, max_length=int(limits.get("max_chars", 5000)),
                                            pattern=serving.NOT_BLANK)]

    class SentimentRequest(serving.Strict):
        texts: list[Text] = Field(min_length=1, max_length=int(limits.get("max_texts", 64)),
                                  description="texts to classify (each with at least one non-space character)")

    return SentimentRequest, SentimentResponse


def serve_batch(model: nn.Module, meta: dict, requests: list[dict], options: dict) -> list[dict | RequestError]:
    """All texts of the batch in one `predict` call; texts over the model's `max_chars` are truncated, with a
    warning."""
    texts = [t for req in requests for t in req["texts"]]
    results = predict(model, meta, texts)
    max_chars = int(meta.get("max_chars") or 0)
    out, lo = [], 0
    for req in requests:
        hi = lo + len(req["texts"])
        warnings = ([f"texts over the model's {max_chars} characters were truncated"]
                    if max_chars and any(len(t) > max_chars for t in req["texts"]) else [])
        out.append({"results": [{"label": str(r["label"]), "probs": {str(k): float(v) for k, v in r["probs"].items()}}
                                for r in results[lo:hi]], "warnings": warnings})
        lo = hi
    return out
