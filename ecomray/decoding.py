"""Decoding for any causal language model that follows `step(ids (B, T), cache, positions) -> logits (B, T, V),
cache`: greedy, beam search and nucleus sampling, with a key/value cache (each step feeds one token per sequence),
a repetition penalty, length limits, `n` variants per prompt, banned terms (`ecomray.compliance.BannedTerms`, masked
at every step) and must-include phrases (when a sequence would end without one, the phrase is written next and the
model carries on from it). Shared by every text-generating family; settings are plain dicts (`Settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ecomray.compliance import BannedTerms


@dataclass
class Settings:
    strategy: str = "greedy"            # greedy | beam | sample
    n: int = 1                          # variants per prompt (beam: the n best beams; sample: n draws)
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    beam_width: int = 4
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0     # > 1 makes every token already in the output less likely
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Settings":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown decoding settings {sorted(unknown)}")
        s = cls(**d)
        if s.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding strategy {s.strategy!r}: use greedy, beam or sample")
        if s.strategy == "greedy" and s.n != 1:
            raise ValueError("greedy decoding gives one variant: use sample or beam for n > 1")
        if s.strategy == "beam" and s.n > s.beam_width:
            raise ValueError(f"n={s.n} is more than beam_width={s.beam_width}")
        return s


@dataclass
class Prompt:
    ids: list[int]                                   # the model's input before the first generated token
    must_include: list[list[int]] = field(default_factory=list)   # token ids of phrases the output must contain


@dataclass
class Special:
    eos: int
    pad: int
    joiner: list[int] = field(default_factory=list)  # written before a forced phrase (e.g. a comma)


def _penalize(logits: torch.Tensor, generated: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL-style: positive logits of tokens already generated divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    for r, toks in enumerate(generated):
        if toks:
            idx = torch.tensor(sorted(set(toks)), device=logits.device)
            row = logits[r, idx]
            logits[r, idx] = torch.where(row > 0, row / penalty, row * penalty)
    return logits


def _contains(seq: list[int], phrase: list[int]) -> bool:
    n = len(phrase)
    return any(seq[i:i + n] == phrase for i in range(len(seq) - n + 1)) if n else True


class _Seq:
    """One sequence being generated: its tokens, compliance state, pending forced tokens, score, done flag."""

    def __init__(self, prompt: Prompt, state: int = 0) -> None:
        self.prompt, self.out, self.state = prompt, [], state
        self.forced: list[int] = []
        self.score, self.done = 0.0, False


def generate(step: Callable[..., Any], prompts: list[Prompt], settings: Settings, special: Special,
             banned: BannedTerms | None = None, token_text: Callable[[int], str] | None = None,
             device: torch.device | str = "cpu") -> list[list[list[int]]]:
    """Generated token ids: for each prompt, `settings.n` variants (without the EOS)."""
    if settings.strategy == "beam":
        return [_beam(step, p, settings, special, banned, token_text, device) for p in prompts]
    g = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    out: list[list[list[int]]] = [[] for _ in prompts]
    expanded = [(k, p) for k, p in enumerate(prompts) for _ in range(settings.n)]
    seqs = [_Seq(p) for _, p in expanded]
    _run(step, seqs, settings, special, banned, token_text, device, g)
    for (k, _), s in zip(expanded, seqs):
        out[k].append(s.out)
    return out


def _prefill(step: Callable[..., Any], seqs: list[_Seq], device: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run the prompts (left-padded; positions count from each prompt's first token) and return the last logits."""
    width = max(len(s.prompt.ids) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)          # True = a real token
    for r, s in enumerate(seqs):
        n = len(s.prompt.ids)
        ids[r, width - n:] = torch.tensor(s.prompt.ids)
        pos[r, width - n:] = torch.arange(n)
        mask[r, width - n:] = True
    logits, cache = step(ids.to(device), None, pos.to(device), mask.to(device))
    lengths = torch.tensor([len(s.prompt.ids) for s in seqs])
    return logits[:, -1].float(), (cache, mask.to(device)), lengths


def _mask(scores: torch.Tensor, seqs: list[_Seq], settings: Settings, special: Special,
          banned: BannedTerms | None) -> torch.Tensor:
    """Rule out, in place, per sequence: tokens that would complete a banned term, EOS before `min_new_tokens`,
    and padding everywhere. Returns `scores`."""
    for r, s in enumerate(seqs):
        if banned is not None:
            bad = banned.banned_tokens(s.state)
            if bad:
                scores[r, bad] = float("-inf")
        if len(s.out) < settings.min_new_tokens:
            scores[r, special.eos] = float("-inf")
    scores[:, special.pad] = float("-inf")
    return scores


def _choose(logits: torch.Tensor, seqs: list[_Seq], settings: Settings, special: Special,
            banned: BannedTerms | None, g: torch.Generator) -> list[int]:
    logits = _mask(_penalize(logits.clone(), [s.out for s in seqs], settings.repetition_penalty),
                   seqs, settings, special, banned)
    if settings.strategy == "greedy":
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / max(settings.temperature, 1e-5), -1).cpu()
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < settings.top_p           # the smallest set reaching top_p
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=g).squeeze(1)
    return order.gather(1, pick[:, None]).squeeze(1).tolist()


def _advance(s: _Seq, tok: int, settings: Settings, special: Special, banned: BannedTerms | None,
             token_text: Callable[[int], str] | None) -> int:
    """Apply the chosen token (or a forced one) to a sequence; returns the token actually fed to the model.

    Must-include phrases still missing are written, one after the other, when the model would end the sequence or
    when the tokens left are just enough for them; the model then carries on from each."""
    if s.forced:
        tok = s.forced.pop(0)
    else:
        missing = [p for p in s.prompt.must_include if not _contains(s.out, p)]
        room = settings.max_new_tokens - len(s.out)
        need = sum(len(special.joiner) + len(p) for p in missing)
        if missing and (tok == special.eos or room <= need):
            s.forced = [*special.joiner, *missing[0]]
            tok = s.forced.pop(0)
        elif tok == special.eos or room <= 0:
            s.done = True
            return special.eos
    s.out.append(tok)
    if banned is not None and token_text is not None:
        s.state = banned.walk(s.state, token_text(tok))[0]
    return tok


def _run(step: Callable[..., Any], seqs: list[_Seq], settings: Settings, special: Special,
         banned: BannedTerms | None, token_text: Callable[[int], str] | None, device: Any,
         g: torch.Generator) -> None:
    logits, (cache, mask), lengths = _prefill(step, seqs, device)
    limit = settings.max_new_tokens + max((sum(len(special.joiner) + len(p) for p in s.prompt.must_include)
                                           for s in seqs), default=0)
    for t in range(limit + 1):
        alive = [r for r, s in enumerate(seqs) if not s.done]
        if not alive:
            break
        choice = _choose(logits, seqs, settings, special, banned, g)
        fed = [special.pad] * len(seqs)
        for r in alive:
            fed[r] = _advance(seqs[r], choice[r], settings, special, banned, token_text)
        if all(s.done for s in seqs):
            break
        ids = torch.tensor(fed, device=device)[:, None]
        pos = (lengths + t).to(device)[:, None]
        mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.bool, device=device)], 1)
        logits, cache = step(ids, cache, pos, mask)
        logits = logits[:, -1].float()


def _beam(step: Callable[..., Any], prompt: Prompt, settings: Settings, special: Special,
          banned: BannedTerms | None, token_text: Callable[[int], str] | None, device: Any) -> list[list[int]]:
    """Beam search for one prompt (beams share its prefill); length-normalized log-probability; the n best."""
    width = settings.beam_width
    logits, (cache, mask), lengths = _prefill(step, [_Seq(prompt)], device)
    beams = [_Seq(prompt)]
    finished: list[_Seq] = []
    for t in range(settings.max_new_tokens):
        logp = _mask(torch.log_softmax(_penalize(logits.clone(), [b.out for b in beams], settings.repetition_penalty), -1),
                     beams, settings, special, banned)
        total = logp + torch.tensor([b.score for b in beams], device=logp.device)[:, None]
        top = total.flatten().topk(min(2 * width, total.numel()))
        new, keep = [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            r, tok = divmod(flat, logp.shape[1])
            if score == float("-inf"):
                break
            b = beams[r]
            child = _Seq(prompt, b.state)
            child.out, child.score = [*b.out, tok], score
            if tok == special.eos:
                child.out = b.out
                finished.append(child)
                continue
            if banned is not None and token_text is not None:
                child.state = banned.walk(b.state, token_text(tok))[0]
            new.append(child)
            keep.append(r)
            if len(new) == width:
                break
        if len(finished) >= width or not new:
            break
        beams = new
        idx = torch.tensor(keep, device=device)
        cache = [tuple(x.index_select(0, idx) for x in layer) for layer in cache]
        mask = torch.cat([mask.index_select(0, idx), torch.ones((len(keep), 1), dtype=torch.bool, device=device)], 1)
        ids = torch.tensor([b.out[-1] for b in beams], device=device)[:, None]
        pos = (lengths[:1].expand(len(beams)) + t).to(device)[:, None]
        logits, cache = step(ids, cache, pos, mask)
        logits = logits[:, -1].float()
    finished.extend(beams)
    best = sorted(finished, key=lambda b: b.score / max(len(b.out), 1) ** 0.7, reverse=True)[:settings.n]
    out = []
    for b in best:                          # must-include phrases missing from a beam: continued greedily
        missing = [p for p in prompt.must_include if not _contains(b.out, p)]
        if missing:
            cont = _Seq(Prompt([*prompt.ids, *b.out, *special.joiner, *missing[0]], missing[1:]), b.state)
            rest = Settings(strategy="greedy", max_new_tokens=max(settings.max_new_tokens - len(b.out), 1),
                            repetition_penalty=settings.repetition_penalty)
            _run(step, [cont], rest, special, banned, token_text, device, torch.Generator().manual_seed(0))
            b.out = [*b.out, *special.joiner, *missing[0], *cont.out]
        out.append(b.out)
    return out
