"""Text features: the leakage guard's normalization key and the character tokenizer (Hugging Face `tokenizers`)."""

from __future__ import annotations

import polars as pl

from ecomray.features.text import CLS_ID, MASK, PAD_ID, UNK_ID, encode, fit_tokenizer, load_tokenizer, text_key, text_key_expr

TEXTS = ["这家酒店的服务很好，房间干净！", "电脑屏幕太差了，发热严重。", "這間酒店環境不錯", "书的内容很一般 ，不推荐"]


def test_text_key_python_and_polars_agree() -> None:
    raw = ["ａｂｃ　酒店 很好\t!", " 书 ", "ＡＢ12"]
    assert [text_key(t) for t in raw] == ["abc酒店很好!", "书", "AB12"]
    assert pl.Series(raw).to_frame("t").select(text_key_expr("t")).to_series().to_list() == [text_key(t) for t in raw]


def test_tokenizer_round_trips_chinese_text_through_its_json() -> None:
    tok = load_tokenizer(fit_tokenizer(TEXTS, vocab_size=500, min_frequency=1).to_str())   # as serving rebuilds it
    for t in TEXTS:
        enc = tok.encode(t, add_special_tokens=False)
        assert UNK_ID not in enc.ids
        assert len(enc.ids) == len(text_key(t))              # one token per character, whitespace dropped
        assert tok.decode(enc.ids) == text_key(t)            # NFKC + whitespace removed, nothing else lost
    assert tok.encode("酒店好吗", add_special_tokens=False).ids[-1] == UNK_ID   # 吗 was never seen
    assert tok.encode(f"酒{MASK}店", add_special_tokens=False).tokens == ["酒", MASK, "店"]


def test_encode_pads_truncates_and_starts_with_cls() -> None:
    tok = fit_tokenizer(TEXTS, vocab_size=500, min_frequency=1)
    ids, lengths = encode(tok, ["酒店", "这家酒店的服务很好"], max_len=5)
    assert ids.shape == (2, 5) and lengths.tolist() == [3, 5]
    assert (ids[:, 0] == CLS_ID).all() and ids[0, 3:].tolist() == [PAD_ID, PAD_ID]
    assert tok.decode(ids[1, 1:].tolist()) == "这家酒店"


def test_min_frequency_and_vocab_size_bound_the_vocabulary() -> None:
    tok = fit_tokenizer(TEXTS, vocab_size=12, min_frequency=1)
    assert tok.get_vocab_size() <= 12
    assert fit_tokenizer(TEXTS, vocab_size=500, min_frequency=2).get_vocab_size() < fit_tokenizer(TEXTS, vocab_size=500, min_frequency=1).get_vocab_size()
