"""The copy-generation family on the generated copy table (no research-only data): attribute parsing, coverage and
hallucination, the banned-term automaton (also for tokens that merge characters), the decoders (greedy, beam,
sampling, the KV cache, must-include phrases, banned terms never written), a tiny train -> registry -> generate, and
the serving schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from ecomray.compliance import BannedTerms
from ecomray.decoding import Prompt, Settings, Special, generate
from ecomray.features import attributes as A
from ecomray.tasks import RequestError
from tests.test_train_next_item import compose_cfg


def test_attribute_strings_coverage_and_hallucination() -> None:
    pairs = A.parse("类型#上衣*颜色#粉红色*图案#刺绣*图案#刺绣")
    assert pairs[0] == ("类型", "上衣") and A.values(pairs) == ["上衣", "粉红色", "刺绣"]
    for bad in ("", "类型", "类型#上衣*颜色", "类型#上衣*#白色", "a#b#c"):
        with pytest.raises(ValueError):
            A.parse(bad)
    assert A.coverage("这件粉红色上衣很好看", pairs) == (2, 3)
    lex = {"颜色": {"粉红色", "红色", "白色"}, "图案": {"刺绣", "条纹"}, "材质": {"棉"}}
    # 红色 is inside the given 粉红色: not invented; 白色 and 条纹 are; 棉 is a key the input does not have
    assert A.hallucinations("粉红色上衣，白色条纹，纯棉", pairs, lex) == ["条纹", "白色"]


def test_banned_terms_automaton_masks_merged_tokens() -> None:
    terms = BannedTerms(["最", "第一", "100%", "国家级"])
    assert terms.find("销量第一，100%纯棉") == ["100%", "第一"]
    vocab = ["", "第", "一", "第一名", "1", "0", "%", "国家", "级", "好"]
    terms.bind(vocab)
    s = terms.walk(0, "第")[0]
    assert set(terms.banned_tokens(s)) == {2, 3}                   # "一" completes 第一; "第一名" contains it
    s = terms.walk(0, "国家")[0]
    assert 8 in terms.banned_tokens(s) and 9 not in terms.banned_tokens(s)
    s = terms.walk(0, "100")[0]
    assert sorted(terms.banned_tokens(s)) == [3, 6]                # "%" completes 100%; 第一名 is banned everywhere
    assert 3 in terms.banned_tokens(0)                               # a token that holds a whole banned term


class _Toy(torch.nn.Module):
    """A fixed "language model": the next token is a function of the previous one (a table of logits)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, positions: Any = None, key_mask: Any = None, cache: Any = None) -> Any:
        k = torch.zeros(ids.shape[0], 1, ids.shape[1], 1) if cache is None else \
            torch.cat([cache[0][0], torch.zeros(ids.shape[0], 1, ids.shape[1], 1)], 2)
        return self.table[ids], [(k, k)]


def _step(model: torch.nn.Module) -> Any:
    return lambda ids, cache, pos, mask: model(ids, pos, mask, cache)


def test_decoders_follow_the_model_and_the_constraints() -> None:
    V, eos, pad = 8, 1, 0
    table = torch.full((V, V), -5.0)
    for a, b in [(2, 3), (3, 4), (4, 5), (5, 1), (6, 7), (7, 1)]:
        table[a, b] = 5.0                                            # 2 -> 3 -> 4 -> 5 -> EOS
    table[3, 6] = 4.0                                                # second choice after 3
    toy = _Toy(table)
    special = Special(eos, pad, joiner=[])
    greedy = generate(_step(toy), [Prompt([2])], Settings(max_new_tokens=10), special)
    assert greedy == [[[3, 4, 5]]]
    beams = generate(_step(toy), [Prompt([2])], Settings(strategy="beam", n=2, beam_width=3, max_new_tokens=10), special)
    assert beams[0][0] == [3, 4, 5] and len(beams[0]) == 2
    # banned: token 4 is what the text "d" writes; the automaton forbids it, so greedy takes the second choice
    text = ["", "", "a", "b", "d", "e", "f", "g"]
    banned = BannedTerms(["bd"]).bind(text)
    got = generate(_step(toy), [Prompt([2])], Settings(max_new_tokens=10), special, banned, lambda i: text[i])
    assert got == [[[3, 6, 7]]] and not banned.find("".join(text[i] for i in got[0][0]))
    # the same term as one prompt's own (Prompt.avoid): that prompt avoids it, its batch-mate does not; beams too
    mine = BannedTerms(["bd"]).bind(text)
    both = generate(_step(toy), [Prompt([2], avoid=mine), Prompt([2])], Settings(max_new_tokens=10), special,
                    token_text=lambda i: text[i])
    assert both == [[[3, 6, 7]], [[3, 4, 5]]]
    beam = generate(_step(toy), [Prompt([2], avoid=mine)], Settings(strategy="beam", n=2, beam_width=3,
                                                                       max_new_tokens=10), special,
                    token_text=lambda i: text[i])
    assert all("bd" not in "".join(text[i] for i in v) for v in beam[0])
    # must-include: the model would stop after 3 4 5; phrase [6] is written, then the model goes on from it
    forced = generate(_step(toy), [Prompt([2], must_include=[[6]])], Settings(max_new_tokens=10), special)
    assert forced == [[[3, 4, 5, 6, 7]]]
    # beams too: a beam without the phrase is continued from the same prompt (its tokens, then the phrase, fed to
    # the model), never from a longer prompt, which an encoder-decoder would read as its source
    prefills: list[list[int]] = []

    def recording(ids: torch.Tensor, cache: Any, pos: Any, mask: Any) -> Any:
        if cache is None:
            prefills.extend(ids.tolist())
        return toy(ids, pos, mask, cache)

    beam_forced = generate(recording, [Prompt([2], must_include=[[6]])],
                           Settings(strategy="beam", n=1, beam_width=3, max_new_tokens=10), special)
    assert beam_forced == [[[3, 4, 5, 6, 7]]] and prefills == [[2], [2]]
    # ... and when the budget is short, the phrase is written before it runs out
    short = generate(_step(toy), [Prompt([2], must_include=[[6]])], Settings(max_new_tokens=3), special)
    assert 6 in short[0][0] and len(short[0][0]) <= 4
    # sampling: seeded, n variants, reproducible
    s1 = generate(_step(toy), [Prompt([2])], Settings(strategy="sample", n=3, seed=5, max_new_tokens=6), special)
    s2 = generate(_step(toy), [Prompt([2])], Settings(strategy="sample", n=3, seed=5, max_new_tokens=6), special)
    assert s1 == s2 and len(s1[0]) == 3
    # ... by the request's seed alone: batched with another prompt, the same copies (one generator shared by the
    # batch's rows made them depend on the batch-mates)
    flat = torch.zeros(V, V)
    flat[:, eos] = -3.0                                              # near-uniform: every draw matters
    flat_toy = _Toy(flat)
    wide = Settings(strategy="sample", n=2, seed=1, max_new_tokens=8)
    alone = generate(_step(flat_toy), [Prompt([2])], wide, special)
    batched = generate(_step(flat_toy), [Prompt([6]), Prompt([2]), Prompt([2])], wide, special)
    assert batched[1] == batched[2] == alone[0] and alone[0][0] != alone[0][1]
    # a top_p too small for float32 (it compared as 0 and kept no token: a 500 from the server) is greedy decoding
    tiny_p = generate(_step(toy), [Prompt([2])], Settings(strategy="sample", n=2, top_p=1e-46, max_new_tokens=10), special)
    assert tiny_p[0] == [greedy[0][0]] * 2
    with pytest.raises(ValueError, match="greedy"):
        Settings.from_dict({"strategy": "greedy", "n": 2})


def test_beam_search_does_not_stop_on_a_cut_off_beam() -> None:
    """Beam search stopped once `beam_width` beams had ended and returned the step before's live beams with them:
    a prefix cut off mid-text ranked above its own continuations (a log-probability only falls as tokens are
    added). Here the model writes "2" for ever (EOS unlikely): beams must follow it to max_new_tokens."""
    V, eos, pad = 6, 1, 0
    table = torch.full((V, V), -20.0)
    table[5, 2], table[5, 1], table[5, 3] = 0.0, -5.0, -5.0         # after the prompt: 2; EOS and 3 unlikely
    table[2, 2], table[2, 1] = 0.0, -6.0                            # after 2: 2 again
    table[3, 1] = 0.0                                               # after 3: EOS
    toy = _Toy(torch.log_softmax(table, -1))
    special = Special(eos, pad, joiner=[])
    greedy = generate(_step(toy), [Prompt([5])], Settings(max_new_tokens=10), special)
    beams = generate(_step(toy), [Prompt([5])], Settings(strategy="beam", n=2, beam_width=2, max_new_tokens=10),
                     special)
    assert greedy == [[[2] * 10]] and beams[0][0] == [2] * 10, beams
    assert len(beams[0]) == 2 and beams[0][1] != beams[0][0]        # no text twice


@pytest.mark.parametrize("max_len", [64, 6])          # 6: the cache outgrows its first buffers mid-decoding
def test_the_real_model_decodes_the_same_with_and_without_its_cache(max_len: int) -> None:
    from ecomray.models.copy_lm import CopyLM

    torch.manual_seed(0)
    model = CopyLM(vocab_size=40, max_len=max_len, dim=16, layers=2, heads=2, ff=32, dropout=0.0).eval()
    prompts = [Prompt([2, 7, 9, 3]), Prompt([2, 11, 3]), Prompt([2, 5, 3])]
    settings = Settings(max_new_tokens=12, repetition_penalty=1.3)
    cached = generate(lambda ids, cache, pos, mask: model(ids, positions=pos, key_mask=mask, cache=cache), prompts,
                      settings, Special(1, 0))
    # a sequence that ends early leaves the batch: the others decode as if alone
    for p, (out,) in zip(prompts, cached):
        alone = generate(lambda ids, cache, pos, mask: model(ids, positions=pos, key_mask=mask, cache=cache), [p],
                         settings, Special(1, 0))
        assert alone == [[out]]
    for p, (out,) in zip(prompts, cached):                        # recompute every step on the whole sequence
        seq = list(p.ids)
        for tok in out:
            logits, _ = model(torch.tensor([seq]))
            masked = logits[0, -1].clone()
            done = torch.tensor(seq[len(p.ids):], dtype=torch.long)
            masked[done] = torch.where(masked[done] > 0, masked[done] / 1.3, masked[done] * 1.3)
            masked[0] = float("-inf")
            assert int(masked.argmax()) == tok
            seq.append(tok)


def test_guidance_strengthens_the_conditions() -> None:
    """Classifier-free guidance: u + g * (c - u) of the conditioned and unconditioned prompts' logits."""
    V, eos, pad = 10, 1, 0
    table = torch.full((V, V), -5.0)
    table[2, 3] = 5.0                                                # unconditioned prompt [2]: 3 is clearly first
    table[8, 3], table[8, 6] = 4.0, 3.5                              # conditioned prompt [8]: 3 still first, 6 close
    for a, b in [(3, 4), (4, 5), (5, eos), (6, 7), (7, eos)]:
        table[a, b] = 5.0
    toy = _Toy(table)
    special = Special(eos, pad)
    cond = Prompt([8], unconditioned=[2])
    assert generate(_step(toy), [cond], Settings(max_new_tokens=6), special) == [[[3, 4, 5]]]      # off by default
    # with guidance 2: token 3 scores 5 + 2 * (4 - 5) = 3, token 6 scores -5 + 2 * (3.5 + 5) = 12
    guided = generate(_step(toy), [cond, Prompt([2])], Settings(max_new_tokens=6, guidance=2.0), special)
    assert guided == [[[6, 7]], [[3, 4, 5]]]                       # a prompt without conditions is unchanged
    beams = generate(_step(toy), [cond], Settings(strategy="beam", n=1, beam_width=2, max_new_tokens=6, guidance=2.0),
                     special)
    assert beams == [[[6, 7]]]
    with pytest.raises(ValueError, match="guidance"):
        Settings.from_dict({"guidance": 0.5})


def test_guided_cached_decoding_equals_recomputation() -> None:
    from ecomray.models.copy_lm import CopyLM

    torch.manual_seed(3)
    model = CopyLM(vocab_size=40, max_len=64, dim=16, layers=2, heads=2, ff=32, dropout=0.0).eval()
    prompts = [Prompt([2, 30, 7, 9, 3], unconditioned=[2, 7, 9, 3]), Prompt([2, 31, 32, 11, 3], unconditioned=[2, 11, 3])]
    settings = Settings(max_new_tokens=10, guidance=2.5)
    out = generate(lambda ids, cache, pos, mask: model(ids, positions=pos, key_mask=mask, cache=cache), prompts,
                   settings, Special(1, 0))
    for p, (toks,) in zip(prompts, out):
        done: list[int] = []
        for tok in toks:
            c = model(torch.tensor([p.ids + done]))[0][0, -1]
            u = model(torch.tensor([p.unconditioned + done]))[0][0, -1]
            logits = u + 2.5 * (c - u)
            logits[0] = float("-inf")
            assert int(logits.argmax()) == tok
            done.append(tok)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit

    root = tmp_path_factory.mktemp("copy")
    cfg = compose_cfg("train", root, "experiment=tiny_copy", "train.epochs=2")
    manifest = prepare(cfg)
    return {"cfg": cfg, "manifest": manifest, "out": fit(cfg)}


def test_prepare_quarantines_bad_rows_and_splits_by_attribute_set(tiny: dict) -> None:
    import polars as pl

    m = tiny["manifest"]
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"] and m["reasons"] == {"bad attribute string": 1,
                                                                                      "empty target": 1}
    df = pl.read_parquet(Path(tiny["cfg"]["paths"]["data"]) / "synthetic_copy" / "shards" / "*.parquet")
    per_set = df.group_by("attributes").agg(pl.col("split").n_unique())
    assert (per_set["split"] == 1).all() and set(df["split"]) == {"train", "val", "test"}


def test_tiny_copy_trains_generates_compliant_covering_copy_and_serves(tiny: dict) -> None:
    from ecomray.inference import load_model
    from ecomray.tasks import copy_gen

    cfg, out = tiny["cfg"], tiny["out"]
    assert out["name"] == "copy_gen_synthetic_copy" and out["history"][-1]["val/loss"] < out["history"][0]["val/loss"]
    loaded = load_model(cfg["paths"]["registry"], out["name"])
    assert loaded.meta["terms"] and "最" in loaded.meta["terms"]
    rows = [{"attributes": "类型#裙*颜色#红色*材质#雪纺*图案#条纹"}, {"title": "夏季新款连衣裙", "aspect": "<1>"}]
    res = loaded.task.predict(loaded.model, loaded.meta, rows, strategy="sample", n=3, seed=3)
    assert [len(r["variants"]) + r["dropped"] for r in res] == [3, 3]
    for v in res[0]["variants"]:
        assert v["missing"] == [] and v["stated"] == v["values"] == 4        # cover_values: every value stated
        assert not copy_gen.banned_terms(loaded.meta).find(v["text"])
    again = loaded.task.predict(loaded.model, loaded.meta, rows, strategy="sample", n=3, seed=3)
    assert again == res                                                     # seeded
    # the values of the input's keys that it does not give (a colour nobody asked for) are never written
    assert loaded.meta["avoid_ungiven_values"] is True
    lex = {k: set(v) for k, v in loaded.meta["lexicon"].items()}
    given = [{"attributes": r["attributes"]} for r in tiny_rows(cfg)[:8]]
    for seed in (1, 2):
        for row, r in zip(given, loaded.task.predict(loaded.model, loaded.meta, given, strategy="sample", n=4,
                                                     seed=seed, temperature=1.5)):
            for v in r["variants"]:
                assert A.hallucinations(v["text"], A.parse(row["attributes"]), lex) == []
    request_model, _ = copy_gen.api(loaded.meta, {"max_n": 4, "max_new_tokens": 100})
    body = request_model.model_validate({"attributes": rows[0]["attributes"], "n": 2, "strategy": "sample"})
    bad_attrs = request_model.model_validate({"attributes": "类型#裙*颜色"}).model_dump()
    nothing = request_model.model_validate({"aspect": "<1>"}).model_dump()
    greedy_many = request_model.model_validate({"attributes": "类型#裙", "n": 2}).model_dump()
    guided = request_model.model_validate({"title": "夏季新款连衣裙", "aspect": "<1>", "guidance": 2.5}).model_dump()
    answers = loaded.task.serve_batch(loaded.model, loaded.meta,
                                      [body.model_dump(), bad_attrs, nothing, greedy_many, guided], {})
    assert len(answers[0]["variants"]) + answers[0]["dropped"] == 2 and answers[0]["all_dropped"] is False
    assert [a.loc for a in answers[1:4]] == [["body", "attributes"], ["body", "attributes"], ["body", "n"]]
    assert all(isinstance(a, RequestError) for a in answers[1:4])
    direct = loaded.task.predict(loaded.model, loaded.meta, [rows[1]],
                                 **{k: guided[k] for k in copy_gen._REQUEST_SETTINGS})
    assert answers[4]["variants"] == direct[0]["variants"]                   # the request's guidance was applied
    for too_much in ({"attributes": "类型#裙", "n": 5}, {"attributes": "类型#裙", "max_new_tokens": 1000},
                     {"attributes": "x" * 401}, {"attributes": "  "}, {"attributes": "类型#裙", "aspect": "<<x"},
                     {"attributes": "类型#裙", "guidance": 0.5}, {"attributes": "类型#裙", "guidance": 9},
                     {"attributes": "类型#裙", "guidance": float("nan")}):
        with pytest.raises(ValidationError):
            request_model.model_validate(too_much)


def tiny_rows(cfg: dict) -> list[dict]:
    import polars as pl

    df = pl.read_parquet(Path(cfg["paths"]["data"]) / "synthetic_copy" / "shards" / "*.parquet")
    return df.filter(pl.col("attributes").is_not_null()).select("attributes").unique(maintain_order=True).to_dicts()


def test_fine_tuning_from_a_version_with_a_shorter_window_keeps_its_positions(tiny: dict) -> None:
    """The pretraining run's window (prompt + copy) may be shorter than the fine-tuning run's: its learned positions
    are kept where both have them, the rest start fresh; every other tensor is the pretrained one."""
    from ecomray import registry
    from ecomray.tasks import copy_gen

    cfg, out = tiny["cfg"], tiny["out"]
    found = registry.load(cfg["paths"]["registry"], out["name"], out["version"])
    longer = {**cfg, "task": {**cfg["task"], "max_prompt": int(cfg["task"]["max_prompt"]) + 40},
              "model": {**cfg["model"], "init_from": f"{out['name']}:{out['version']}"}}
    data = copy_gen.build_data(longer)
    model = copy_gen.build_model(longer, data)
    pos, old = model.state_dict()["pos.weight"], found["state_dict"]["pos.weight"]
    assert pos.shape[0] == old.shape[0] + 40 and torch.equal(pos[: old.shape[0]], old)
    assert torch.equal(model.state_dict()["tok.weight"], found["state_dict"]["tok.weight"])


def test_lm_pretraining_holds_out_disjoint_val_and_test_texts(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """objective lm held one set of texts out and used it as both val and test: the registered test/loss was the
    validation loss that chose the checkpoint."""
    from ecomray.tasks import copy_gen

    corpus = [f"第{k}件商品很好看，推荐购买{k % 7}" for k in range(1000)]
    monkeypatch.setattr(copy_gen, "_corpus", lambda cfg: (corpus, {}))
    cfg = {**tiny["cfg"], "task": {**tiny["cfg"]["task"], "objective": "lm"}}
    data = copy_gen.build_data(cfg)
    val, test, train = ({tuple(t) for _, t in data.seqs[s]} for s in ("val", "test", "train"))
    assert len(val) == len(test) == 20 and not val & test and not (val | test) & train
    assert len(train) == len(corpus) - 40


def test_batch_scoring_keeps_every_variant(tiny: dict) -> None:
    """batch_predict.options n=2 decoded two copies per row and kept only the first."""
    import pyarrow as pa

    from ecomray.inference import load_model

    cfg, out = tiny["cfg"], tiny["out"]
    loaded = load_model(cfg["paths"]["registry"], out["name"])
    rows = pa.Table.from_pylist(tiny_rows(cfg)[:3])
    got = loaded.task.batch_score(loaded.model, loaded.meta, rows, {"strategy": "sample", "n": 2, "seed": 1})
    variants, first = got["variants"].to_pylist(), got["copy"].to_pylist()
    assert got.num_rows == 3 and all(len(v) + d == 2 for v, d in zip(variants, got["dropped"].to_pylist()))
    assert [v[0] if v else None for v in variants] == first
