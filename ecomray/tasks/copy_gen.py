"""Attribute-conditioned copy generation (ad copy, product descriptions): merchant attributes (`类型#上衣*颜色#白色`)
or a product title, optional aspect and audience tags (KOBE style), in; Chinese marketing copy out.

Two objectives on the one training loop (`task.objective`):
- `lm`: language-model pretraining on unlabelled text: the train split of the review datasets in `task.corpora`
  (every text equal to one of their val/test texts excluded, as the MLM task does) and the copy datasets' training
  targets. The character tokenizer (Hugging Face `tokenizers`) is fitted here, on that text only.
- `copy`: fine-tuning on (prompt, copy) pairs of the copy dataset and `task.extra_train` (e.g. kobe), the loss on the
  copy alone; initialized from a pretraining version by registry ref (`model.init_from`), whose tokenizer it keeps.

Two models (`model=copy_lm | copy_seq2seq`), the same prompt `[CLS] <conditions> input [SEP]` and copy (ending with
`[EOS]`) for both: `ecomray/models/copy_lm.py` is decoder-only (the copy follows the prompt in one sequence);
`ecomray/models/copy_seq2seq.py` (`encoder_decoder = True`) encodes the prompt and decodes the copy from a `[SEP]`
start token, attending to the encoded prompt (training batches: `src`/`src_mask`/`tgt`/`labels` instead of
`ids`/`labels`). Pretraining (`lm`), and so `model.init_from` a pretraining version, is decoder-only; the
encoder-decoder trains from scratch (benchmarks/copy_arch.py compares the two under one time budget).

Decoding (`ecomray/decoding.py`): greedy, beam, nucleus sampling, n variants, a KV cache, a repetition penalty; banned
terms (`task.compliance`, the PRC Advertising Law's absolute claims) are masked at every step and checked after (a
variant that still has one is dropped and counted); with `task.cover_values` a copy that would end before stating an
attribute value writes it next and carries on (`must_include`); with
`task.avoid_ungiven_values` the values of the input's keys that the training lexicon knows and the input does not
give (a colour nobody asked for) are masked like banned terms, per row (`Prompt.avoid`), so the copy cannot invent them.

Metrics: val/test `loss` (CE per copy token) and, on `task.eval_generate` rows decoded greedily, `bleu4` and
`rouge_l` (the AdvertiseGen protocol, ecomray/generation_metrics.py) and `coverage` (share of input values stated).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pydantic import BaseModel, Field, StringConstraints
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import Regex
from torch import nn

from ecomray import serving
from ecomray.compliance import BannedTerms, TokenIndex
from ecomray.data import shards
from ecomray.decoding import Prompt, Settings, Special, generate
from ecomray.features import attributes as A
from ecomray.inference import init_version
from ecomray.runtime import UserError
from ecomray.tasks import RequestError

KEY_METRICS = ("bleu4", "rouge_l", "coverage", "loss")
ROUTE = "copy"
PAD, UNK, CLS, SEP, EOS = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"
SPECIALS = [PAD, UNK, CLS, SEP, EOS]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, EOS_ID = range(5)


# ----------------------------------------------------------------------------------------------- tokenizer
def fit_tokenizer(texts: list[str], conditions: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """One token per character, characters kept exactly as written (no normalization: full-width punctuation is part
    of the copy); the condition tags (<asp:4>, <aud:a>) are special tokens."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[*SPECIALS, *sorted(set(conditions))], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == EOS_ID
    return tok


@functools.lru_cache(maxsize=8)
def tokenizer(tok_json: str) -> Tokenizer:
    return Tokenizer.from_str(tok_json)


@functools.lru_cache(maxsize=8)
def token_texts(tok_json: str) -> tuple[str, ...]:
    """id -> the characters the token writes ("" for special tokens)."""
    tok = tokenizer(tok_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    out = [""] * tok.get_vocab_size(with_added_tokens=True)
    for text, i in vocab.items():
        out[i] = "" if (text in SPECIALS or (text.startswith("<") and text.endswith(">") and len(text) > 1)) else text
    return tuple(out)


def conditions(aspect: str | None, audience: str | None) -> list[str]:
    """The condition tokens of a row: `<asp:4>` for aspect `<4>`, `<aud:a>` for audience `<a>`."""
    out = []
    if aspect:
        out.append(f"<asp:{aspect.strip('<>')}>")
    if audience:
        out.append(f"<aud:{audience.strip('<>')}>")
    return out


def encode_text(tok_json: str, text: str) -> list[int]:
    return tokenizer(tok_json).encode(text, add_special_tokens=False).ids


def prompt_ids(tok_json: str, row: dict[str, Any], max_prompt: int) -> list[int]:
    """[CLS] <conditions> input [SEP], the input cut to fit `max_prompt` tokens."""
    tok = tokenizer(tok_json)
    cond = [i for c in conditions(row.get("aspect"), row.get("audience")) if (i := tok.token_to_id(c)) is not None]
    text = row.get("attributes") or row.get("title") or ""
    body = encode_text(tok_json, text)[: max(1, max_prompt - 2 - len(cond))]
    return [CLS_ID, *cond, *body, SEP_ID]


def decode(tok_json: str, ids: list[int]) -> str:
    texts = token_texts(tok_json)
    return "".join(texts[i] for i in ids if 0 <= i < len(texts))


# ----------------------------------------------------------------------------------------------- data
@dataclass
class CopyData:
    objective: str
    tok_json: str
    max_prompt: int
    max_target: int
    rows: dict[str, list[dict]]                          # split -> rows (attributes/title/aspect/audience/target)
    seqs: dict[str, list[tuple[list[int], list[int]]]]   # split -> (prompt ids, target ids + EOS)
    terms: list[str]
    lexicon: dict[str, list[str]]
    counts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder_decoder: bool = False                        # set by build_model: batches of (prompt, decoder input)
    cfg: dict = field(repr=False, default_factory=dict)


def _copy_rows(cfg: dict, name: str) -> pl.DataFrame:
    df = shards.read_frame(cfg, name)
    if "target" not in df.columns:
        raise UserError(f"{shards.dataset_dir(cfg, name)}: not a copy dataset (prepare it with schema=copy)")
    return df


def _corpus(cfg: dict) -> tuple[list[str], dict[str, int]]:
    """objective lm: review train texts (val/test texts of any review dataset excluded) + copy training targets."""
    from ecomray.features.text import text_key_expr
    from ecomray.tasks.sentiment import read_reviews

    t = cfg["task"]
    frames = [read_reviews(cfg, n) for n in t.get("corpora") or []]
    texts: list[str] = []
    counts: dict[str, int] = {}
    if frames:
        all_rows = pl.concat([f.select("text", "split") for f in frames])
        eval_keys = all_rows.filter(pl.col("split") != "train").select(text_key_expr("text").alias("k"))["k"]
        train = all_rows.filter(pl.col("split") == "train")
        leak = text_key_expr("text").is_in(eval_keys.implode())
        counts["review_texts_equal_to_eval_text_dropped"] = int(train.select(leak.sum()).item())
        texts += train.filter(~leak)["text"].to_list()
    for name in [cfg["dataset"]["name"], *(t.get("extra_train") or [])]:
        df = _copy_rows(cfg, name).filter(pl.col("split") == "train")
        texts += df["target"].to_list()
    counts["corpus_texts"] = len(texts)
    return texts, counts


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> CopyData:
    t = cfg["task"]
    objective = str(t.get("objective", "copy"))
    if objective not in ("copy", "lm"):
        raise UserError(f"task.objective={objective!r}: use copy or lm")
    max_prompt, max_target = int(t.get("max_prompt", 96)), int(t.get("max_target", 160))
    main = _copy_rows(cfg, cfg["dataset"]["name"])
    extra = [_copy_rows(cfg, n).filter(pl.col("split") == "train") for n in t.get("extra_train") or []]
    cols = ["attributes", "title", "aspect", "audience", "target"]
    train = pl.concat([f.select(cols) for f in [main.filter(pl.col("split") == "train"), *extra]])
    rows = {"train": train.to_dicts(), "val": main.filter(pl.col("split") == "val").select(cols).to_dicts(),
            "test": main.filter(pl.col("split") == "test").select(cols).to_dicts()}
    counts: dict[str, Any] = {"rows": {s: len(r) for s, r in rows.items()}}
    corpus: list[str] = []
    if objective == "lm":
        corpus, c = _corpus(cfg)
        counts.update(c)
    init = init_version(cfg)
    if init is not None:
        tok_json = init["meta"]["tokenizer"]
        counts["tokenizer_from"] = f"{cfg['model']['init_from']} ({init['version']})"
    else:
        texts = corpus + [r["target"] for r in rows["train"]] + [r["attributes"] or r["title"] or "" for r in rows["train"]]
        conds = [c for r in rows["train"] for c in conditions(r["aspect"], r["audience"])]
        conds += [f"<asp:{k}>" for k in range(26)] + [f"<aud:{k}>" for k in "abc"]
        tk = t.get("tokenizer") or {}
        tok_json = fit_tokenizer(texts, conds, int(tk.get("vocab_size", 8000)), int(tk.get("min_frequency", 1))).to_str()
    seqs: dict[str, list[tuple[list[int], list[int]]]] = {}
    if objective == "lm":
        g = np.random.default_rng(int(cfg.get("seed", 0)))
        # two disjoint held-out sets of up to 2% (2,000 texts) each: val picks the epoch, test is not the same
        # texts (it was: the registered test/loss was the validation loss that chose the checkpoint)
        n_held = min(len(corpus) // 50, 2000)
        drawn = g.choice(len(corpus), size=min(2 * n_held, len(corpus)), replace=False).tolist()
        parts = {"val": sorted(drawn[:n_held]), "test": sorted(drawn[n_held:])}
        held = set(drawn)
        enc = [encode_text(tok_json, x)[: max_prompt + max_target - 2] for x in corpus]
        seqs["train"] = [([CLS_ID], [*e, EOS_ID]) for k, e in enumerate(enc) if k not in held and e]
        for split, ks in parts.items():
            seqs[split] = [([CLS_ID], [*enc[k], EOS_ID]) for k in ks if enc[k]]
    else:
        for s, rs in rows.items():
            seqs[s] = [(prompt_ids(tok_json, r, max_prompt), [*encode_text(tok_json, r["target"])[:max_target], EOS_ID])
                       for r in rs]
    lex = A.lexicon(A.parse(r["attributes"]) for r in rows["train"] if r["attributes"])
    comp = t.get("compliance") or {}
    return CopyData(objective, tok_json, max_prompt, max_target, rows, seqs, list(comp.get("terms") or []),
                    {k: sorted(v) for k, v in lex.items()}, counts, rank, world_size, cfg=cfg)


# ----------------------------------------------------------------------------------------------- model
def build_model(cfg: dict, data: CopyData) -> nn.Module:
    data.model_kwargs = {"vocab_size": tokenizer(data.tok_json).get_vocab_size(with_added_tokens=True),
                         "max_len": data.max_prompt + data.max_target + 8}
    model = instantiate({k: v for k, v in cfg["model"].items() if k != "init_from"}, **data.model_kwargs)
    data.encoder_decoder = bool(getattr(model, "encoder_decoder", False))
    if data.encoder_decoder and data.objective == "lm":
        raise UserError(f"task.objective=lm (pretraining on unlabelled text) needs a decoder-only model, and "
                        f"model={cfg['model'].get('_target_')} is an encoder-decoder: use model=copy_lm for "
                        "pretraining, or task.objective=copy")
    init = init_version(cfg)
    if init is not None:
        mine = model.state_dict()
        state = {k: v for k, v in init["state_dict"].items() if k in mine}
        missing = [k for k in mine if k not in state]
        if data.encoder_decoder and missing:
            raise UserError(f"model.init_from={cfg['model']['init_from']}: the version has no {missing[:3]} "
                            f"({len(missing)} of this model's {len(mine)} tensors): an encoder-decoder starts from "
                            "an encoder-decoder version of the same layers; a decoder-only (copy_lm) pretraining "
                            "version cannot initialize it. Set model.init_from=null to train it from scratch")
        for table in ("pos.weight", "enc_pos.weight", "dec_pos.weight"):
            pos = state.get(table)
            if pos is not None and pos.shape[1:] == mine[table].shape[1:] and pos.shape[0] != mine[table].shape[0]:
                # a longer (or shorter) window than the pretraining run's: its learned positions where both have
                # them, this model's fresh initialization beyond (fine-tuning learns them)
                n = min(pos.shape[0], mine[table].shape[0])
                grown = mine[table].clone()
                grown[:n] = pos[:n]
                state[table] = grown
                print(f"[copy] positions{'' if table == 'pos.weight' else ' (' + table.split('.')[0] + ')'}: "
                      f"{n} from {cfg['model']['init_from']}, {mine[table].shape[0] - n} new", flush=True)
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(mine[k].shape)]
        if bad:
            raise UserError(f"model.init_from={cfg['model']['init_from']}: shapes differ for {bad[:3]} "
                            "(use the pretraining run's model settings)")
        model.load_state_dict(state, strict=False)
        print(f"[copy] initialized from {cfg['model']['init_from']} ({init['version']})", flush=True)
    return model


# ----------------------------------------------------------------------------------------------- training
def _batch(pairs: list[tuple[list[int], list[int]]], loss_on_prompt: bool) -> dict[str, torch.Tensor]:
    """(B, L) ids right-padded and labels: the next token where it counts (the copy, or everything for lm), -100
    elsewhere."""
    L = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), L), PAD_ID, dtype=torch.long)
    labels = torch.full((len(pairs), L), -100, dtype=torch.long)
    for r, (p, t) in enumerate(pairs):
        seq = p + t
        ids[r, :len(seq)] = torch.tensor(seq)
        start = 1 if loss_on_prompt else len(p)
        labels[r, start:len(seq)] = torch.tensor(seq[start:])
    return {"ids": ids, "labels": labels}


def _seq2seq_batch(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """For an encoder-decoder: the prompts (B, S) right-padded with `src_mask` (True: a real token); the decoder
    input `tgt` (B, T) = [SEP] + copy[:-1] and `labels` (B, T) = the copy (ending with EOS), -100 on padding."""
    S, T = max(len(p) for p, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.full((len(pairs), S), PAD_ID, dtype=torch.long)
    src_mask = torch.zeros((len(pairs), S), dtype=torch.bool)
    tgt = torch.full((len(pairs), T), PAD_ID, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for r, (p, t) in enumerate(pairs):
        src[r, :len(p)] = torch.tensor(p)
        src_mask[r, :len(p)] = True
        tgt[r, :len(t)] = torch.tensor([SEP_ID, *t[:-1]])
        labels[r, :len(t)] = torch.tensor(t)
    return {"src": src, "src_mask": src_mask, "tgt": tgt, "labels": labels}


def _make_batch(data: CopyData, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    return _seq2seq_batch(pairs) if data.encoder_decoder else _batch(pairs, data.objective == "lm")


def train_batches(data: CopyData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Length-sorted chunks (less padding), shuffled; pure in (epoch, seed)."""
    pairs = data.seqs["train"]
    g = np.random.default_rng(seed * 100_003 + epoch)
    idx = np.arange(data.rank, len(pairs), data.world)
    idx = idx[g.permutation(len(idx))]
    lengths = np.array([len(pairs[i][0]) + len(pairs[i][1]) for i in idx])
    batches = []
    chunk = batch_size * 20
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk][np.argsort(lengths[lo:lo + chunk], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    for b in (batches[i] for i in g.permutation(len(batches))):
        yield _make_batch(data, [pairs[i] for i in b])


def _logits_labels(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the labels they predict. The batch says which model it is for (under DDP the model is a wrapper
    that does not show the class's `encoder_decoder`)."""
    if "src" in batch:
        return model(batch["src"], batch["src_mask"], batch["tgt"]), batch["labels"]        # (B, T, V), (B, T)
    logits, _ = model(batch["ids"][:, :-1])                                                 # (B, L-1, V)
    return logits, batch["labels"][:, 1:]


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, labels = _logits_labels(model, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def _loss(model: nn.Module, data: CopyData, split: str, batch_size: int = 64) -> float:
    pairs = data.seqs[split]
    total, count = 0.0, 0
    for lo in range(0, len(pairs), batch_size):
        logits, labels = _logits_labels(model, _make_batch(data, pairs[lo:lo + batch_size]))
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


EVAL_OPTIONS = ("eval_generate", "decoding", "cover_values", "avoid_ungiven_values")   # evaluate.task


def evaluate(model: nn.Module, data: CopyData, split: str) -> dict[str, float]:
    """`loss`; for the copy objective also BLEU-4 / ROUGE-L / coverage of greedy copies for the first
    `task.eval_generate` rows of the split (0: loss only)."""
    was = model.training
    model.eval()
    # the model says which batches it takes: jobs.evaluate builds it from the version, not through build_model
    # (an encoder-decoder version was fed decoder-only batches: a TypeError)
    data.encoder_decoder = data.encoder_decoder or bool(getattr(model, "encoder_decoder", False))
    out = {"loss": _loss(model, data, split)}
    n = int(data.cfg["task"].get("eval_generate", 0) or 0)
    if data.objective == "copy" and n:
        rows = data.rows[split][:n]
        copies = predict(model, metadata(data), rows)
        texts = [c["variants"][0]["text"] if c["variants"] else "" for c in copies]
        from ecomray.generation_metrics import corpus_scores

        scores = corpus_scores(texts, [r["target"] for r in rows])
        stated = total = 0
        for r, text in zip(rows, texts):
            if r["attributes"]:
                s, t = A.coverage(text, A.parse(r["attributes"]))
                stated, total = stated + s, total + t
        out.update(bleu4=scores["bleu-4"], rouge_l=scores["rouge-l"], coverage=stated / max(total, 1))
    model.train(was)
    return out


def metadata(data: CopyData) -> dict:
    examples = [{"attributes": r["attributes"], "n": 2, "strategy": "sample", "seed": 1}
                for r in data.rows["train"][:3] if r["attributes"]]
    examples += [{"title": r["title"], "aspect": r["aspect"], "audience": r["audience"]}
                 for r in data.rows["train"] if r["title"] and r["aspect"]][:1]
    decoding = dict(data.cfg["task"].get("decoding") or {})
    return {"tokenizer": data.tok_json, "objective": data.objective, "max_prompt": data.max_prompt,
            "max_target": data.max_target, "model_kwargs": data.model_kwargs, "terms": data.terms,
            "lexicon": data.lexicon, "counts": data.counts, "decoding": decoding,
            "cover_values": bool(data.cfg["task"].get("cover_values", True)),
            "avoid_ungiven_values": bool(data.cfg["task"].get("avoid_ungiven_values", True)), "examples": examples}


# ----------------------------------------------------------------------------------------------- generating
def _step(model: nn.Module) -> Any:
    if getattr(model, "encoder_decoder", False):
        def step(ids: torch.Tensor, cache: Any, pos: torch.Tensor, mask: torch.Tensor) -> Any:
            return model.step(ids, cache, pos, mask, start=SEP_ID)        # the decoder starts where training did
        return step

    def step(ids: torch.Tensor, cache: Any, pos: torch.Tensor, mask: torch.Tensor) -> Any:
        return model(ids, positions=pos, key_mask=mask, cache=cache)
    return step


_BANNED: dict[tuple[int, tuple[str, ...]], BannedTerms] = {}


@functools.lru_cache(maxsize=8)
def _token_index(tok_json: str) -> TokenIndex:
    return TokenIndex(list(token_texts(tok_json)))


def banned_terms(meta: dict, terms: tuple[str, ...] | None = None) -> BannedTerms:
    """Banned terms (the version's, or `terms`) bound to the version's vocabulary; the most recent 256 term
    sets are kept (a row's automaton is ~0.1 MB), so a repeated input reuses its automaton."""
    terms = tuple(meta.get("terms") or ()) if terms is None else terms
    key = (hash(meta["tokenizer"]), terms)
    if key not in _BANNED:
        if len(_BANNED) >= 256:
            del _BANNED[next(iter(_BANNED))]
        _BANNED[key] = BannedTerms(terms).bind(_token_index(meta["tokenizer"]))
    return _BANNED[key]


def ungiven_values(pairs: list[tuple[str, str]], lexicon: dict[str, list[str]]) -> tuple[str, ...]:
    """The values `attributes.hallucinations` would count: of the input's keys, in the lexicon, not part of a given
    value."""
    given = A.values(pairs)
    return tuple(sorted({v for k in {k for k, _ in pairs} for v in lexicon.get(k, ())
                         if "<" not in v and not any(v in g for g in given)}))


@torch.inference_mode()
def predict(model: nn.Module, meta: dict, inputs: list[dict[str, Any]], **decoding: Any) -> list[dict[str, Any]]:
    """For each input row ({attributes | title, aspect, audience}): {"variants": [{"text", "stated", "values",
    "missing"}], "dropped": variants removed for a banned term}. Decoding settings: the version's defaults
    (`task.decoding`), then `decoding`; `avoid_ungiven_values` overrides the version's setting."""
    avoid = bool(decoding.pop("avoid_ungiven_values", meta.get("avoid_ungiven_values", False)))
    settings = Settings.from_dict({**(meta.get("decoding") or {}), **decoding})
    settings.max_new_tokens = min(settings.max_new_tokens, int(meta["max_target"]) + 1)
    tok_json = meta["tokenizer"]
    comma = encode_text(tok_json, "，")
    prompts = []
    for row in inputs:
        pairs = A.parse(row["attributes"]) if row.get("attributes") else []
        must = [encode_text(tok_json, v) for v in A.values(pairs)] if meta.get("cover_values", True) else []
        others = banned_terms(meta, ungiven_values(pairs, meta.get("lexicon") or {})) if avoid and pairs else None
        plain = ({**row, "aspect": None, "audience": None}
                 if conditions(row.get("aspect"), row.get("audience")) else None)   # for guidance: no conditions
        prompts.append(Prompt(prompt_ids(tok_json, row, int(meta["max_prompt"])), must, others,
                              prompt_ids(tok_json, plain, int(meta["max_prompt"])) if plain else None))
    banned = banned_terms(meta)
    texts = token_texts(tok_json)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = generate(_step(model), prompts, settings, Special(EOS_ID, PAD_ID, comma), banned,
                   lambda i: texts[i] if 0 <= i < len(texts) else "", device)
    model.train(was)
    out = []
    for row, variants in zip(inputs, ids):
        pairs = A.parse(row["attributes"]) if row.get("attributes") else []
        kept, dropped = [], 0
        for v in variants:
            text = decode(tok_json, v)
            if banned.find(text):
                dropped += 1
                continue
            vals = A.values(pairs)
            kept.append({"text": text, "stated": sum(x in text for x in vals), "values": len(vals),
                         "missing": [x for x in vals if x not in text]})
        out.append({"variants": kept, "dropped": dropped})
    return out


# ----------------------------------------------------------------------------------------------- batch prediction
def batch_inputs(cfg: dict, split: str) -> shards.ShardScan:
    return shards.scan(cfg, split)


BATCH_OPTIONS = (*Settings.__dataclass_fields__, "avoid_ungiven_values")   # decoding settings


def batch_score(model: nn.Module, meta: dict, batch: pa.Table, options: dict) -> pa.Table:
    """Per row: `copy` (the first variant, with the version's decoding defaults or `options`), `variants` (every
    compliant variant: `n` > 1 asks for several; only the first was kept), its coverage, and the dropped count."""
    rows = batch.select([c for c in ("attributes", "title", "aspect", "audience") if c in batch.column_names]).to_pylist()
    res = predict(model, meta, rows, **{k: v for k, v in options.items()
                                        if k in Settings.__dataclass_fields__ or k == "avoid_ungiven_values"})
    return pa.table({"copy": pa.array([r["variants"][0]["text"] if r["variants"] else None for r in res], pa.string()),
                     "variants": pa.array([[v["text"] for v in r["variants"]] for r in res], pa.list_(pa.string())),
                     "values_stated": pa.array([r["variants"][0]["stated"] if r["variants"] else 0 for r in res],
                                               pa.int32()),
                     "dropped": pa.array([r["dropped"] for r in res], pa.int32())})


# ----------------------------------------------------------------------------------------------- serving
Tag = Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=r"^<?[0-9a-z]+>?$")]


class Variant(BaseModel):
    text: str
    stated: int = Field(description="input attribute values the copy states")
    values: int = Field(description="distinct input attribute values")
    missing: list[str] = Field(default_factory=list)


class CopyResponse(serving.Response):
    variants: list[Variant]
    dropped: int = Field(description="variants removed because they contained a banned term")
    all_dropped: bool = Field(description="true when every variant was removed: nothing compliant to return")


def api(meta: dict, limits: dict) -> tuple[type[BaseModel], type[BaseModel]]:
    """POST /v1/copy: attributes (key#value*...) or a title, optional aspect/audience tags, decoding settings within
    the caps in `limits` (n, max_new_tokens, beam_width, input characters)."""
    chars = int(limits.get("max_input_chars", 400))
    Text = Annotated[str, StringConstraints(min_length=1, max_length=chars, pattern=serving.NOT_BLANK)]

    class CopyRequest(serving.Strict):
        attributes: Text | None = Field(None, description="merchant attributes, key#value pairs joined by *")
        title: Text | None = Field(None, description="a product title, when there are no attributes")
        aspect: Tag | None = None
        audience: Tag | None = None
        n: serving.Int = Field(1, ge=1, le=int(limits.get("max_n", 4)))
        strategy: str = Field("greedy", pattern="^(greedy|beam|sample)$")
        max_new_tokens: serving.Int = Field(int(meta["max_target"]), ge=8, le=int(limits.get("max_new_tokens", 200)))
        beam_width: serving.Int = Field(4, ge=1, le=int(limits.get("max_beam_width", 8)))
        top_p: float = Field(0.9, gt=0.0, le=1.0)
        temperature: float = Field(1.0, gt=0.0, le=2.0)
        repetition_penalty: float = Field(1.2, ge=1.0, le=2.0)
        seed: serving.Int = Field(0, ge=0, le=2**31 - 1)
        guidance: float = Field(1.0, ge=1.0, le=float(limits.get("max_guidance", 4.0)),
                                description="strength of the aspect/audience conditions (classifier-free guidance): "
                                            "1 = the model as trained; above 1 costs a second forward pass")
        avoid_ungiven_values: bool | None = Field(
            None, description="mask values of the input's keys that the input does not give (a colour nobody asked "
                              "for); default: the version's setting")

    return CopyRequest, CopyResponse


_REQUEST_SETTINGS = ("n", "strategy", "max_new_tokens", "beam_width", "top_p", "temperature", "repetition_penalty",
                     "seed", "guidance")


def serve_batch(model: nn.Module, meta: dict, requests: list[dict], options: dict) -> list[dict | RequestError]:
    """Each request is checked (input present, attribute string well formed, settings coherent), then generated on
    its own settings; requests with the same settings share one `generate` call."""
    out: list[Any] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for n, req in enumerate(requests):
        if not req.get("attributes") and not req.get("title"):
            out[n] = RequestError(["body", "attributes"], "give attributes (key#value*...) or a title")
            continue
        if req.get("attributes"):
            try:
                A.parse(req["attributes"])
            except ValueError as err:
                out[n] = RequestError(["body", "attributes"], str(err))
                continue
        settings = {k: req[k] for k in _REQUEST_SETTINGS}
        try:
            Settings.from_dict(settings)
        except ValueError as err:
            out[n] = RequestError(["body", "n" if "n=" in str(err) or "variant" in str(err) else "strategy"], str(err))
            continue
        groups.setdefault(repr((sorted(settings.items()), req.get("avoid_ungiven_values"))), []).append(n)
    for members in groups.values():
        first = requests[members[0]]
        settings = {k: first[k] for k in _REQUEST_SETTINGS}
        if first.get("avoid_ungiven_values") is not None:
            settings["avoid_ungiven_values"] = first["avoid_ungiven_values"]
        res = predict(model, meta, [requests[n] for n in members], **settings)
        for n, r in zip(members, res):
            out[n] = {**r, "all_dropped": not r["variants"],
                      "warnings": ["every variant contained a banned term and was dropped"] if not r["variants"] else []}
    return out
