"""The review sentiment family on the generated review table (no public dataset needed): the tiny_sentiment run,
the predict contract used by serving, the TF-IDF baseline as a servable model, MLM pretraining -> fine-tuning, the
local Hugging Face path with a tiny random BERT, and the opinion report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecomray import registry
from ecomray.data.prepare import run as prepare
from ecomray.inference import load_model
from ecomray.models.text_encoder import TextClassifier
from ecomray.tasks import sentiment
from ecomray.train.driver import fit
from tests.test_train_next_item import compose_cfg


def _cfg(tmp: Path, *overrides: str) -> dict:
    cfg = compose_cfg("train", tmp, "experiment=tiny_sentiment", *overrides)
    if not (tmp / "data" / "synthetic_reviews" / "manifest.json").exists():
        prepare(cfg)
    return cfg


def test_encoder_shapes() -> None:
    m = TextClassifier(vocab_size=50, num_classes=3, max_len=12, dim=16, layers=1, heads=2, ff=32)
    ids = torch.randint(5, 50, (4, 10))
    ids[1, 6:] = 0
    assert m(ids).shape == (4, 3)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2] = mask[3, 4] = True
    assert m(ids, mlm_mask=mask).shape == (2, 50)
    m.eval()
    a = m(ids)[1]
    ids2 = ids.clone()
    ids2[1, 6:] = 0
    assert torch.allclose(a, m(ids2)[1])        # padding doesn't leak into the pooled state


def test_tiny_sentiment_trains_registers_and_predict_matches(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    out = fit(cfg)
    m = out["metrics"]
    assert m["val/accuracy"] > 0.85 and m["test/accuracy"] > 0.85 and 0.85 < m["test/macro_f1"] <= 1.0
    loaded = load_model(cfg["paths"]["registry"], out["name"], out["version"])
    meta = loaded.meta
    assert meta["labels"] == ["negative", "positive"] and meta["tokenizer_kind"] == "char"
    conf = np.array(meta["confusion"]["test"])
    assert conf.sum() == 199 and np.trace(conf) / conf.sum() == pytest.approx(m["test/accuracy"])
    assert set(meta["per_category"]["test"]) == {"手机", "酒店", "书籍", "衣服", "水果"}
    res = sentiment.predict(loaded.model, meta, ["质量很好，非常满意！", "质量太差，非常失望，不会再买。"])
    assert [r["label"] for r in res] == ["positive", "negative"]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in res)
    # long texts are truncated to max_chars: the characters after the cut change nothing
    base = "质量太差，非常失望。" * 10
    long = sentiment.predict(loaded.model, meta, [base, base + "质量很好非常满意物超所值" * 50])
    assert long[0]["probs"] == pytest.approx(long[1]["probs"])
    with pytest.raises(ValueError):
        sentiment.predict(loaded.model, meta, ["好", "  "])


def test_tfidf_baseline_is_a_servable_state_dict(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "model=tfidf_lr", "train.epochs=1", "model.Cs=[1.0,10.0]", "registry_name=tfidf_syn")
    out = fit(cfg)
    assert out["metrics"]["val/accuracy"] > 0.9
    found = registry.load(cfg["paths"]["registry"], out["name"], out["version"])
    assert set(found["state_dict"]) == {"idf", "coef", "intercept"}           # arrays, no pickle
    assert found["meta"]["fit"]["C"] in (1.0, 10.0) and len(found["meta"]["model_kwargs"]["vocabulary"]) == found["state_dict"]["idf"].numel()
    loaded = load_model(cfg["paths"]["registry"], out["name"], out["version"])
    data = sentiment.build_data(cfg)
    p_eval = sentiment.probabilities(loaded.model, data, "test")
    res = sentiment.predict(loaded.model, loaded.meta, data.texts["test"][:20])
    assert np.allclose([r["probs"]["positive"] for r in res], p_eval[:20, 1], atol=1e-5)
    # the same numbers as scikit-learn's own pipeline
    from sklearn.linear_model import LogisticRegression

    from ecomray.features.text import tfidf_vectorizer

    vec = tfidf_vectorizer(None, 1, 3, True, min_df=2, max_features=300000)
    X = vec.fit_transform(data.texts["train"])
    lr = LogisticRegression(C=found["meta"]["fit"]["C"], solver="liblinear", max_iter=2000).fit(X, data.y["train"])
    assert np.allclose(lr.predict_proba(vec.transform(data.texts["test"][:20]))[:, 1], p_eval[:20, 1], atol=1e-4)


def test_tfidf_is_fitted_on_texts_cut_as_they_are_scored(tmp_path: Path) -> None:
    """Evaluation and serving cut texts to task.max_chars; the TF-IDF fit saw them whole (n-grams the model can
    never be shown at scoring time, and C chosen on uncut validation texts)."""
    cfg = _cfg(tmp_path, "model=tfidf_lr", "model.Cs=[1.0]", "task.max_chars=6")
    data = sentiment.build_data(cfg)
    sentiment.build_model(cfg, data)
    from ecomray.models.tfidf_lr import fit_tfidf_lr

    opts = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    train, val = ([x[:6] for x in data.texts[s]] for s in ("train", "val"))
    on_cut = fit_tfidf_lr(train, data.y["train"], val, data.y["val"], num_classes=len(data.labels), **opts)[0]
    whole = fit_tfidf_lr(data.texts["train"], data.y["train"], data.texts["val"], data.y["val"],
                         num_classes=len(data.labels), **opts)[0]
    assert data.model_kwargs["vocabulary"] == on_cut["vocabulary"] != whole["vocabulary"]


def test_tfidf_vocabulary_with_omegaconf_specials_loads() -> None:
    """n-grams like "???" or "${x}" must survive the registry round trip (no OmegaConf on the vocabulary)."""
    from ecomray.models.tfidf_lr import TfidfLR

    vocab = ["???", "${x}", "好", "差"]
    model = TfidfLR(vocabulary=vocab)
    state = {"idf": torch.ones(4), "coef": torch.tensor([[0.0, 0.0, 2.0, -2.0]]), "intercept": torch.zeros(1)}
    found = {"config": {"model": {"_target_": "ecomray.models.tfidf_lr.TfidfLR", "ngram_min": 1, "ngram_max": 3,
                                  "Cs": [1.0]}},
             "meta": {"model_kwargs": {"vocabulary": vocab, "num_classes": 2}}, "state_dict": state}
    model = sentiment.load_model(found)
    meta = {"labels": ["negative", "positive"], "max_chars": 100, "tokenizer_kind": "none"}
    res = sentiment.predict(model, meta, ["好", "差", "???"])
    assert [r["label"] for r in res[:2]] == ["positive", "negative"]
    assert res[2]["probs"]["positive"] == pytest.approx(0.5)       # "???" carries weight 0


def test_mlm_pretraining_then_finetune_from_its_checkpoint(tmp_path: Path) -> None:
    mcfg = _cfg(tmp_path, "task=mlm", "registry_name=mlm_syn", "train.monitor=val/mlm_acc", "train.epochs=2")
    mlm = fit(mcfg)
    assert 0.0 < mlm["metrics"]["val/mlm_acc"] <= 1.0
    pre = registry.load(mcfg["paths"]["registry"], "mlm_syn", mlm["version"])
    filled = load_model(mcfg["paths"]["registry"], "mlm_syn", mlm["version"])
    guess = filled.task.predict(filled.model, filled.meta, ["质量很[MASK]，非常满意", "发货太慢"])
    assert len(guess[0]) == 1 and guess[1] == []
    ft = _cfg(tmp_path, f"model.init_from=mlm_syn:{mlm['version']}", "train.epochs=1")
    data = sentiment.build_data(ft)
    assert data.tok_json == pre["meta"]["tokenizer"]                       # the pretraining run's tokenizer
    model = sentiment.build_model(ft, data)
    assert torch.equal(model.state_dict()["tok.weight"], pre["state_dict"]["tok.weight"])
    # an unpinned reference ("prod, else best, else the newest") is pinned as the run starts: the workers, the
    # scoring, the registered config and a later jobs.evaluate use that version's tokenizer, whatever is
    # registered meanwhile
    out = fit(_cfg(tmp_path, "model.init_from=mlm_syn", "train.epochs=1"))
    assert out["metrics"]["test/accuracy"] > 0.8
    registered = registry.load(mcfg["paths"]["registry"], out["name"], out["version"])
    assert registered["config"]["model"]["init_from"] == f"mlm_syn:{mlm['version']}"
    bad = _cfg(tmp_path, f"model.init_from=mlm_syn:{mlm['version']}", "model.dim=48")
    from ecomray.runtime import UserError

    with pytest.raises(UserError, match="shapes differ"):
        sentiment.build_model(bad, sentiment.build_data(bad))


def _tiny_bert(folder: Path, texts: list[str], specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
               **tokenizer: str) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = sorted({c for t in texts for c in t if not c.isspace()})
    folder.mkdir()
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    BertTokenizerFast(vocab=vocab, **tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(chars) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)


def test_hf_padding_id_is_the_tokenizers_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary whose padding token is not [PAD] (RoBERTa: <pad> = 1, <s> = 0) was padded with 0 and 0 was
    masked out of attention: its start token was hidden from the encoder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    texts = sentiment.build_data(_cfg(tmp_path)).texts["train"]
    _tiny_bert(tmp_path / "bert", texts, ("<s>", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<pad>"), pad_token="<pad>")
    hcfg = _cfg(tmp_path, "model=hf_encoder", f"model.pretrained_dir={tmp_path / 'bert'}")
    data = sentiment.build_data(hcfg)
    model = sentiment.build_model(hcfg, data)
    short = int(data.lengths["train"].argmin())
    assert data.ids["train"][short, data.lengths["train"][short]:].tolist() == \
        [5] * (data.max_len - data.lengths["train"][short])
    assert model.pad_id == 5 and 0 not in data.ids["train"][:, :1]


def test_hf_encoder_from_a_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # nothing may be downloaded
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = _cfg(tmp_path)
    data0 = sentiment.build_data(cfg)
    _tiny_bert(tmp_path / "bert", data0.texts["train"])
    hcfg = _cfg(tmp_path, "model=hf_encoder", f"model.pretrained_dir={tmp_path / 'bert'}", "registry_name=hf_syn",
                "optim.lr=0.001")
    out = fit(hcfg)
    assert out["metrics"]["test/accuracy"] > 0.8
    loaded = load_model(hcfg["paths"]["registry"], "hf_syn", out["version"])   # rebuilt from meta, not the folder
    assert loaded.meta["tokenizer_kind"] == "hf"
    data = sentiment.build_data(hcfg)
    p = sentiment.probabilities(loaded.model, data, "test")
    res = sentiment.predict(loaded.model, loaded.meta, data.texts["test"][:10])
    assert np.allclose([r["probs"]["positive"] for r in res], p[:10, 1], atol=1e-4)
    from ecomray.runtime import UserError

    with pytest.raises(UserError, match="not a local directory"):
        sentiment.build_data(_cfg(tmp_path, "model=hf_encoder", f"model.pretrained_dir={tmp_path / 'missing'}"))


def test_opinion_report_on_generated_reviews(tmp_path: Path) -> None:
    from ecomray.opinion import run as opinion
    from ecomray.runtime import UserError

    cfg = _cfg(tmp_path, "model=tfidf_lr", "train.epochs=1", "model.Cs=[10.0]", "registry_name=tfidf_syn")
    fit(cfg)
    ocfg = compose_cfg("opinion", tmp_path, "dataset=synthetic_reviews", "opinion.model=tfidf_syn")
    s = opinion(ocfg)
    report = Path(s["report"]).read_text()
    assert "## Most negative categories" in report and "share_over_time.png" in report
    assert set(s["plots"]) >= {"share_by_category.png", "most_negative.png", "share_over_time.png"}
    worst = s["by_category"][0]
    assert worst["category"] == "衣服"          # the generator's most negative category (60% negative)
    assert any(w in ("粗糙", "失望", "后悔", "太慢", "很怪", "不值") for w, _ in s["terms"]["衣服"][:5])
    # a re-run replaces the folder whole: a file of an earlier run (a plot this run does not draw) does not stay
    folder = Path(s["report"]).parent
    (folder / "stale.png").write_bytes(b"old")
    again = opinion(ocfg)
    assert not (folder / "stale.png").exists() and "stale.png" not in again["plots"]
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f"{folder.name}.")) == []
    # a folder holding other files (the reports folder itself) is refused, not replaced; a trailing / is fine
    (folder.parent / "m-v0001-test.json").write_text("{}")
    with pytest.raises(UserError, match="holds files that are not an opinion report"):
        opinion({**ocfg, "opinion": {**ocfg["opinion"], "out": str(folder.parent)}})
    assert (folder.parent / "m-v0001-test.json").exists()
    assert opinion({**ocfg, "opinion": {**ocfg["opinion"], "out": f"{folder}/"}})["report"] == str(folder / "report.md")
    # a finished sweep folder has a summary.json too: it used to be taken for a report and replaced (its trials lost);
    # so is a report folder where the user put a file of their own
    sweep = tmp_path / "sweep"
    (sweep / "trial_0").mkdir(parents=True)
    (sweep / "summary.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds files that are not an opinion report \(no report.md\)"):
        opinion({**ocfg, "opinion": {**ocfg["opinion"], "out": str(sweep)}})
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that are not an opinion report \('notes.txt'\)"):
        opinion(ocfg)
    assert (sweep / "trial_0").is_dir() and (folder / "notes.txt").exists()


def test_opinion_plots_stay_readable_and_blank_texts_are_left_out(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """700 categories drew a 77,000-pixel-high terms plot and 700 bars in one; a review whose text is only a control
    character (which prepare's whitespace rule let through) failed the report with a traceback."""
    import polars as pl

    from ecomray.opinion import run as opinion

    cfg = _cfg(tmp_path, "model=tfidf_lr", "train.epochs=1", "model.Cs=[10.0]", "registry_name=tfidf_syn")
    fit(cfg)
    ocfg = compose_cfg("opinion", tmp_path, "dataset=synthetic_reviews", "opinion.model=tfidf_syn",
                       "opinion.top_categories=3")
    read = sentiment.read_reviews           # a table prepared before blank texts were quarantined
    monkeypatch.setattr(sentiment, "read_reviews", lambda *a: read(*a).with_columns(
        text=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("\x1c")).otherwise(pl.col("text"))))
    s = opinion(ocfg)
    assert s["rows"] == read(ocfg, "synthetic_reviews").height - 1
    from PIL import Image

    if "negative_terms.png" in s["plots"]:                  # (a CJK font is installed)
        with Image.open(Path(s["report"]).parent / "negative_terms.png") as im:
            assert im.size[1] <= 3 * 110 + 10               # 3 categories: one row of plots


def test_epoch_fraction_splits_a_pass_into_loop_epochs_deterministically() -> None:
    idx = np.arange(103)
    parts = [sentiment.epoch_part(idx, e, seed=7, fraction=1 / 3)[0] for e in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()                       # one pass, no row twice
    assert np.array_equal(parts[1], sentiment.epoch_part(idx, 1, seed=7, fraction=1 / 3)[0])   # a resumed run replays it
    assert not np.array_equal(np.sort(sentiment.epoch_part(idx, 3, 7, 1 / 3)[0]), np.sort(parts[0]))   # next pass reshuffles


@pytest.mark.parametrize("setting,says", [("max_rows", -1990), ("max_rows", 0), ("top_terms", "abc"),
                                          ("time_bucket", "bogus"), ("time_bucket", "0d"), ("time_bucket", "1d12h"),
                                          ("time_bucket", "500ns"), ("split", "bogus")])
def test_opinion_settings_no_report_can_use_fail_before_scoring(setting: str, says: object) -> None:
    """`opinion.max_rows=-1990` scored 10 rows, `max_rows=0` all of them; `top_terms=abc` and `time_bucket=bogus`
    were tracebacks after the scoring."""
    from ecomray.opinion import _check_settings
    from ecomray.runtime import UserError

    with pytest.raises(UserError, match=rf"opinion.{setting}="):
        _check_settings({setting: says})
    _check_settings({"max_rows": 5, "top_terms": 3, "time_bucket": "1mo"})
