"""Text-generation metrics with the published AdvertiseGen protocol (THUDM ChatGLM-6B `ptuning/main.py`), computed
with the libraries, not by hand: BLEU-4 is NLTK's `sentence_bleu` over characters with smoothing method 3, ROUGE-1/2/L
are `rouge_chinese.Rouge` F-scores over jieba-segmented text; each x100 per example, then averaged. Distinct-n is
the share of distinct n-grams (characters) over all n-grams of a set of outputs.
"""

from __future__ import annotations

from typing import Iterable


def bleu4(pred: str, ref: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return 100.0 * sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3)


def rouge(pred: str, ref: str) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l"} F x100 on jieba words; 0 when either side has no words (as the protocol)."""
    import jieba
    from rouge_chinese import Rouge

    jieba.setLogLevel(60)
    hyp, gold = " ".join(jieba.cut(pred)), " ".join(jieba.cut(ref))
    if not hyp.split() or not gold.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = Rouge().get_scores(hyp, gold)[0]
    return {k: 100.0 * v["f"] for k, v in scores.items()}


def corpus_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-1/2/L over aligned predictions and references."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    totals = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for p, r in zip(preds, refs):
        totals["bleu-4"] += bleu4(p, r)
        for k, v in rouge(p, r).items():
            totals[k] += v
    return {k: v / len(preds) for k, v in totals.items()}


def distinct(texts: Iterable[str], n: int) -> float:
    grams: list[str] = []
    for t in texts:
        grams.extend(t[i:i + n] for i in range(len(t) - n + 1))
    return len(set(grams)) / max(len(grams), 1)
