"""The encoder-decoder copy model (ecomray/models/copy_seq2seq.py) in the copy family: its cached decoding equals full
recomputation (rows leaving the batch, the cache outgrowing its buffers), its training batches line the labels up
with the decoder input, and a tiny train -> registry -> generate on the generated copy table; what it cannot do
(pretraining, starting from a decoder-only version) fails with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ecomray.decoding import Prompt, Settings, Special, generate
from ecomray.features import attributes as A
from ecomray.runtime import UserError
from tests.test_train_next_item import compose_cfg

START = 3                                         # the task's SEP_ID: where the decoder starts


def _step(model: torch.nn.Module):
    return lambda ids, cache, pos, mask: model.step(ids, cache, pos, mask, start=START)


@pytest.mark.parametrize("max_len", [64, 6])          # 6: the decoder's cache outgrows its first buffers
@torch.no_grad()                                      # as predict decodes (under inference_mode)
def test_cached_decoding_equals_recomputing_the_decoder_every_step(max_len: int) -> None:
    from ecomray.models.copy_seq2seq import CopySeq2Seq

    torch.manual_seed(8)                              # a seed where a copy ends early at both window sizes
    model = CopySeq2Seq(vocab_size=40, max_len=max_len, dim=16, enc_layers=2, dec_layers=2, heads=2, ff=32,
                        dropout=0.0).eval()
    prompts = [Prompt([2, 7, 9, 3]), Prompt([2, 11, 3]), Prompt([2, 5, 30, 21, 17, 3])]
    settings = Settings(max_new_tokens=12, repetition_penalty=1.3)
    cached = generate(_step(model), prompts, settings, Special(1, 0))
    lengths = [len(out) for (out,) in cached]
    assert min(lengths) < 12 and max(lengths) == 12, lengths        # one row leaves the batch, another runs on
    # a batch-mate that ends early, or left padding of a shorter prompt, changes nothing: each decodes as if alone
    for p, (out,) in zip(prompts, cached):
        assert generate(_step(model), [p], settings, Special(1, 0)) == [[out]]
    for p, (out,) in zip(prompts, cached):                          # the whole decoder input again at every step
        src = torch.tensor([p.ids])
        tgt = [START]
        for tok in out:
            logits = model(src, torch.ones_like(src, dtype=torch.bool), torch.tensor([tgt]))
            masked = logits[0, -1].clone()
            done = torch.tensor(tgt[1:], dtype=torch.long)
            masked[done] = torch.where(masked[done] > 0, masked[done] / 1.3, masked[done] * 1.3)
            masked[0] = float("-inf")
            assert int(masked.argmax()) == tok
            tgt.append(tok)
    # rows selected from the cache (beams reordered) carry their memory and padding mask with them
    ids = torch.tensor([[0, 0, 2, 11, 3], [2, 7, 9, 9, 3]])
    mask = ids != 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits, cache = model.step(ids, None, pos, mask, start=START)
    flipped = cache.select(torch.tensor([1, 0]))
    assert cache.length == flipped.length == 1
    nxt = torch.tensor([[5], [6]])
    a, _ = model.step(nxt, cache, None, None, start=START)
    b, _ = model.step(nxt.flip(0), flipped, None, None, start=START)
    assert torch.allclose(a, b.flip(0), atol=1e-5)


def test_seq2seq_batches_put_the_start_token_before_the_copy() -> None:
    from ecomray.tasks.copy_gen import EOS_ID, PAD_ID, SEP_ID, _seq2seq_batch

    b = _seq2seq_batch([([2, 10, 3], [20, 21, EOS_ID]), ([2, 3], [22, EOS_ID])])
    assert b["src"].tolist() == [[2, 10, 3], [2, 3, PAD_ID]]
    assert b["src_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["tgt"].tolist() == [[SEP_ID, 20, 21], [SEP_ID, 22, PAD_ID]]
    assert b["labels"].tolist() == [[20, 21, EOS_ID], [22, EOS_ID, -100]]


SEQ2SEQ = ("experiment=tiny_copy", "model=copy_seq2seq", "~model.layers", "model.enc_layers=1", "model.dec_layers=1",
           "train.epochs=2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit

    root = tmp_path_factory.mktemp("copy_seq2seq")
    cfg = compose_cfg("train", root, *SEQ2SEQ)
    prepare(cfg)
    return {"cfg": cfg, "root": root, "out": fit(cfg)}


def test_tiny_seq2seq_trains_and_generates_compliant_covering_copy(tiny: dict) -> None:
    from ecomray.inference import load_model
    from ecomray.models.copy_seq2seq import CopySeq2Seq
    from ecomray.tasks import copy_gen

    cfg, out = tiny["cfg"], tiny["out"]
    history = out["history"]
    assert len(history) == 2 and history[-1]["val/loss"] < history[0]["val/loss"]
    assert {"val/bleu4", "val/rouge_l", "val/coverage"} <= set(history[-1])
    loaded = load_model(cfg["paths"]["registry"], out["name"])          # rebuilt from the version alone
    assert isinstance(loaded.model, CopySeq2Seq)
    rows = [{"attributes": "类型#裙*颜色#红色*材质#雪纺*图案#条纹"}, {"title": "夏季新款连衣裙", "aspect": "<1>"}]
    res = loaded.task.predict(loaded.model, loaded.meta, rows)
    assert [r["dropped"] for r in res] == [0, 0] and [len(r["variants"]) for r in res] == [1, 1]
    first = res[0]["variants"][0]
    assert first["values"] == 4 and first["stated"] == 4 and first["missing"] == []     # cover_values
    assert A.coverage(first["text"], A.parse(rows[0]["attributes"])) == (4, 4)
    assert not copy_gen.banned_terms(loaded.meta).find(first["text"])
    sampled = loaded.task.predict(loaded.model, loaded.meta, rows[:1], strategy="sample", n=3, seed=3)
    assert len(sampled[0]["variants"]) + sampled[0]["dropped"] == 3
    assert sampled == loaded.task.predict(loaded.model, loaded.meta, rows[:1], strategy="sample", n=3, seed=3)


def test_jobs_evaluate_rescores_a_seq2seq_version(tiny: dict) -> None:
    """jobs.evaluate builds the model from the version, not through build_model, which set the batch layout: an
    encoder-decoder version was fed decoder-only batches (TypeError: forward() missing 2 arguments)."""
    from ecomray.evaluation import evaluate_version

    cfg, out = tiny["cfg"], tiny["out"]
    report = evaluate_version({**cfg, "evaluate": {"model": f"{out['name']}:{out['version']}", "split": "test"}})
    assert report["metrics"]["model"]["loss"] == pytest.approx(out["metrics"]["test/loss"], rel=1e-5)


def test_seq2seq_refuses_pretraining_and_a_decoder_only_starting_point(tiny: dict) -> None:
    from ecomray import registry
    from ecomray.tasks import copy_gen

    cfg, root = tiny["cfg"], tiny["root"]
    lm = compose_cfg("train", root, *SEQ2SEQ, "task.objective=lm")
    with pytest.raises(UserError, match="task.objective=lm"):
        copy_gen.build_model(lm, copy_gen.build_data(lm))
    # a decoder-only version (as a pretraining run registers it) cannot start an encoder-decoder
    dec = compose_cfg("train", root, "experiment=tiny_copy")
    data = copy_gen.build_data(dec)
    model = copy_gen.build_model(dec, data)
    version = registry.register(cfg["paths"]["registry"], "tiny_copy_lm", model.state_dict(), dec, {},
                                copy_gen.metadata(data), {})
    start = {**cfg, "model": {**cfg["model"], "init_from": f"tiny_copy_lm:{version}"}}
    with pytest.raises(UserError, match="model.init_from=tiny_copy_lm"):
        copy_gen.build_model(start, copy_gen.build_data(start))
    # ... while its own version does
    again = {**cfg, "model": {**cfg["model"], "init_from": tiny["out"]["name"]}}
    found = registry.load(cfg["paths"]["registry"], tiny["out"]["name"])
    rebuilt = copy_gen.build_model(again, copy_gen.build_data(again))
    assert all(torch.equal(v, found["state_dict"][k]) for k, v in rebuilt.state_dict().items())
    assert Path(found["path"]).is_dir()
