"""Pure functions over merchant attribute strings (`类型#上衣*材质#牛仔布*颜色#白色`), shared by the data plane
(validation), training (the model's input prefix), evaluation (coverage, hallucination) and serving.

- `parse(s)`: [(key, value)] in order; ValueError saying what is wrong for an empty string, a pair without exactly
  one `#`, or an empty key or value.
- `coverage(text, pairs)`: how many of the input's distinct values the text states literally, and how many there are.
- `lexicon(rows)`: key -> every value seen for it in training; `hallucinations(text, pairs, lex)`: values of the
  input's keys, from the lexicon, that the text states but the input does not give (a colour nobody asked for).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

PAIR_SEP, KV_SEP = "*", "#"


def parse(s: str) -> list[tuple[str, str]]:
    """`k#v*k#v` -> [(k, v), ...]."""
    if not isinstance(s, str) or not s.strip():
        raise ValueError("empty attribute string")
    pairs = []
    for n, part in enumerate(s.strip().split(PAIR_SEP)):
        bits = part.split(KV_SEP)
        if len(bits) != 2:
            raise ValueError(f"pair {n + 1} ({part[:40]!r}) is not key#value")
        k, v = bits[0].strip(), bits[1].strip()
        if not k or not v:
            raise ValueError(f"pair {n + 1} ({part[:40]!r}) has an empty key or value")
        pairs.append((k, v))
    return pairs


def values(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """The distinct values, in input order."""
    out: list[str] = []
    for _, v in pairs:
        if v not in out:
            out.append(v)
    return out


def coverage(text: str, pairs: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """(distinct input values stated literally in `text`, distinct input values)."""
    vals = values(pairs)
    return sum(v in text for v in vals), len(vals)


def lexicon(rows: Iterable[list[tuple[str, str]]]) -> dict[str, set[str]]:
    lex: dict[str, set[str]] = defaultdict(set)
    for pairs in rows:
        for k, v in pairs:
            lex[k].add(v)
    return dict(lex)


def hallucinations(text: str, pairs: list[tuple[str, str]], lex: dict[str, set[str]]) -> list[str]:
    """Values of the input's keys (from the training lexicon) that `text` states and the input does not give. A
    value that is part of a given value (红色 inside 粉红色) does not count; `<UNK>` placeholders never count."""
    given = values(pairs)
    out = []
    for k in {k for k, _ in pairs}:
        for v in lex.get(k, ()):
            if v in text and "<" not in v and not any(v in g for g in given) and v not in out:
                out.append(v)
    return sorted(out)
