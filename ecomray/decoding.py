"""Decoding for any causal language model that follows `step(ids (B, T), cache, positions) -> logits (B, T, V),
cache`: greedy, beam search and nucleus sampling, with a key/value cache (each step feeds one token per sequence),
a repetition penalty, length limits, `n` variants per prompt, classifier-free guidance of a prompt's conditions
(`Settings.guidance`, `Prompt.unconditioned`), banned terms (`ecomray.compliance.BannedTerms`, masked
at every step: one automaton for every prompt, e.g. the advertising law, and optionally one per prompt, e.g. attribute
values the input did not give) and must-include phrases (when a sequence would end without one, the phrase is
written next and the model carries on from it). Shared by every text-generating family; settings are plain dicts
(`Settings`).

Sequences that have finished leave the batch (their rows of the cache are dropped), so a batch costs what its
sequences need rather than `max_new_tokens` steps for every row. The cache is the model's: decoding only reorders
it, through `cache.select(index)` when it has one, else as nested lists/tuples of batch-first tensors.
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
    guidance: float = 1.0               # > 1 strengthens the prompt's conditions (Prompt.unconditioned): see _Guided

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
        if not s.guidance >= 1.0:
            raise ValueError(f"guidance={s.guidance}: use 1 (off) or more")
        return s


@dataclass
class Prompt:
    ids: list[int]                                   # the model's input before the first generated token
    must_include: list[list[int]] = field(default_factory=list)   # token ids of phrases the output must contain
    avoid: BannedTerms | None = None                 # this prompt's own banned terms (bound to the vocabulary)
    unconditioned: list[int] | None = None           # the same prompt without its conditions (for `guidance`)


@dataclass
class Special:
    eos: int
    pad: int
    joiner: list[int] = field(default_factory=list)  # written before a forced phrase (e.g. a comma)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: positive logits of tokens already generated (`seen`, (B, V) bool) divided by `penalty`, negative
    ones multiplied. Only the seen entries are touched (a few per row), not the whole (B, V) matrix."""
    if penalty == 1.0:
        return logits
    rows, toks = seen.nonzero(as_tuple=True)
    hit = logits[rows, toks]
    out = logits.clone()
    out[rows, toks] = torch.where(hit > 0, hit / penalty, hit * penalty)
    return out


def _seen(outs: list[list[int]], vocab: int, device: Any) -> torch.Tensor:
    seen = torch.zeros((len(outs), vocab), dtype=torch.bool, device=device)
    for r, toks in enumerate(outs):
        if toks:
            seen[r, toks] = True
    return seen


def _select(cache: Any, idx: torch.Tensor) -> Any:
    """The cache's rows `idx` (batch-first), in that order."""
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, idx)
    if isinstance(cache, (list, tuple)):
        return type(cache)(_select(x, idx) for x in cache)
    return cache.select(idx)


class _Seq:
    """One sequence being generated: its tokens, automaton states (shared terms, the prompt's own), must-include
    phrases already written, pending forced tokens, score, done flag."""

    def __init__(self, prompt: Prompt, state: int = 0, astate: int = 0) -> None:
        self.prompt, self.out, self.state, self.astate = prompt, [], state, astate
        self.written = [not p for p in prompt.must_include]
        self.forced: list[int] = []
        self.score, self.done = 0.0, False
        self.rng: torch.Generator | None = None     # sampling: this row's own draws (see `generate`)

    def append(self, tok: int, banned: BannedTerms | None, token_text: Callable[[int], str] | None) -> None:
        self.out.append(tok)
        for k, p in enumerate(self.prompt.must_include):
            if not self.written[k] and self.out[-len(p):] == p:
                self.written[k] = True
        self.feed(tok, banned, token_text)

    def feed(self, tok: int, banned: BannedTerms | None, token_text: Callable[[int], str] | None) -> None:
        """Move the automata over the token's text."""
        if token_text is not None:
            text = token_text(tok)
            if banned is not None:
                self.state = banned.walk(self.state, text)[0]
            if self.prompt.avoid is not None:
                self.astate = self.prompt.avoid.walk(self.astate, text)[0]

    def missing(self) -> list[list[int]]:
        return [p for p, w in zip(self.prompt.must_include, self.written) if not w]


@torch.no_grad()                     # decoding never needs gradients (and the cache is written in place)
def generate(step: Callable[..., Any], prompts: list[Prompt], settings: Settings, special: Special,
             banned: BannedTerms | None = None, token_text: Callable[[int], str] | None = None,
             device: torch.device | str = "cpu") -> list[list[list[int]]]:
    """Generated token ids: for each prompt, `settings.n` variants (without the EOS)."""
    guided = settings.guidance != 1.0 and any(p.unconditioned is not None for p in prompts)
    if settings.strategy == "beam":
        return [_beam(_Guided(step, [p], settings.guidance, device) if guided else step, p, settings, special, banned,
                      token_text, device) for p in prompts]
    out: list[list[list[int]]] = [[] for _ in prompts]
    expanded = [(k, j, p) for k, p in enumerate(prompts) for j in range(settings.n)]
    seqs = [_Seq(p) for _, _, p in expanded]
    if settings.strategy == "sample":
        # One generator per row, seeded by (seed, variant): a request's copies depend on its seed alone, not on
        # which requests were batched with it (one shared generator made them differ alone and in a batch).
        for (_, j, _), s in zip(expanded, seqs):
            s.rng = torch.Generator(device="cpu").manual_seed((int(settings.seed) * 1_000_003 + j) % (1 << 63))
    if guided:
        step = _Guided(step, [p for _, _, p in expanded], settings.guidance, device)
    _run(step, seqs, settings, special, banned, token_text, device)
    for (k, _, _), s in zip(expanded, seqs):
        out[k].append(s.out)
    return out


class _GuidedCache:
    """The conditioned rows' cache and, row for row, the unconditioned ones' (cache, key mask, next position)."""

    def __init__(self, cond: Any, uncond: Any, mask: torch.Tensor, pos: torch.Tensor) -> None:
        self.cond, self.uncond, self.mask, self.pos = cond, uncond, mask, pos

    def select(self, idx: torch.Tensor) -> "_GuidedCache":
        return _GuidedCache(_select(self.cond, idx), _select(self.uncond, idx), self.mask.index_select(0, idx),
                            self.pos.index_select(0, idx))


class _Guided:
    """A `step` that decodes each row twice, with its prompt and with `Prompt.unconditioned` (the prompt without its
    conditions), both fed the same tokens, and returns u + guidance * (c - u): classifier-free guidance, which
    moves the text further in the direction the conditions move it (guidance 1 = the conditioned model alone).
    A row without conditions decodes its own prompt twice, so its logits are its own. Costs a second forward."""

    def __init__(self, step: Callable[..., Any], prompts: list[Prompt], guidance: float, device: Any) -> None:
        self.step, self.guidance, self.device = step, float(guidance), device
        self.unconditioned = [p.unconditioned if p.unconditioned is not None else p.ids for p in prompts]

    def __call__(self, ids: torch.Tensor, cache: Any, pos: torch.Tensor, mask: torch.Tensor) -> Any:
        if cache is None:                          # prefill: the unconditioned prompts, left-padded like _prefill's
            logits, c = self.step(ids, None, pos, mask)
            width = max(len(u) for u in self.unconditioned)
            u_ids = torch.zeros((len(self.unconditioned), width), dtype=torch.long)
            u_pos = torch.zeros_like(u_ids)
            u_mask = torch.zeros((len(self.unconditioned), width), dtype=torch.bool)
            for r, u in enumerate(self.unconditioned):
                u_ids[r, width - len(u):] = torch.tensor(u)
                u_pos[r, width - len(u):] = torch.arange(len(u))
                u_mask[r, width - len(u):] = True
            u_logits, u = self.step(u_ids.to(self.device), None, u_pos.to(self.device), u_mask.to(self.device))
            nxt = torch.tensor([len(x) for x in self.unconditioned], device=self.device)
            cache = _GuidedCache(c, u, u_mask.to(self.device), nxt)
        else:
            logits, c = self.step(ids, cache.cond, pos, mask)
            u_mask = torch.cat([cache.mask, torch.ones((len(ids), 1), dtype=torch.bool, device=cache.mask.device)], 1)
            u_logits, u = self.step(ids, cache.uncond, cache.pos[:, None], u_mask)
            cache = _GuidedCache(c, u, u_mask, cache.pos + 1)
        c_last, u_last = logits[:, -1:].float(), u_logits[:, -1:].float()
        return u_last + self.guidance * (c_last - u_last), cache


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
    and padding everywhere. Returns `scores`. The (row, token) pairs are gathered first and set in one indexing
    operation (one per row cost more than the model's attention at batch 32)."""
    rows: list[int] = []
    toks: list[int] = []
    for r, s in enumerate(seqs):
        for terms, state in ((banned, s.state), (s.prompt.avoid, s.astate)):
            if terms is not None:
                bad = terms.banned_tokens(state)
                if bad:
                    rows += [r] * len(bad)
                    toks += bad
        if len(s.out) < settings.min_new_tokens:
            rows.append(r)
            toks.append(special.eos)
    if rows:
        scores[torch.tensor(rows, device=scores.device), torch.tensor(toks, device=scores.device)] = float("-inf")
    scores[:, special.pad] = float("-inf")
    return scores


def _choose(logits: torch.Tensor, seen: torch.Tensor, seqs: list[_Seq], settings: Settings, special: Special,
            banned: BannedTerms | None) -> list[int]:
    logits = _mask(_penalize(logits, seen, settings.repetition_penalty), seqs, settings, special, banned)
    if settings.strategy == "greedy":
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / max(settings.temperature, 1e-5), -1).cpu()
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < settings.top_p           # the smallest set reaching top_p
    keep[:, 0] = True     # the likeliest token always: a top_p below float32's range (1e-46) compared as 0
    sorted_p = sorted_p * keep
    cdf = (sorted_p / sorted_p.sum(-1, keepdim=True)).cumsum(-1)
    u = torch.stack([torch.rand((), generator=s.rng) for s in seqs])    # each row's own draw (inverse CDF)
    pick = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    # a cdf that rounds below u at its end: the last token with any probability (a masked one, banned or
    # padding, has none, yet may sit inside `keep` when top_p is 1)
    pick = torch.minimum(pick, ((sorted_p > 0).sum(-1) - 1).clamp(min=0))
    return order.gather(1, pick[:, None]).squeeze(1).tolist()


def _advance(s: _Seq, tok: int, settings: Settings, special: Special, banned: BannedTerms | None,
             token_text: Callable[[int], str] | None) -> int:
    """Apply the chosen token (or a forced one) to a sequence; returns the token actually fed to the model.

    Must-include phrases still missing are written, one after the other, when the model would end the sequence or
    when the tokens left are just enough for them; the model then carries on from each."""
    if s.forced:
        tok = s.forced.pop(0)
    else:
        missing = s.missing()
        room = settings.max_new_tokens - len(s.out)
        need = sum(len(special.joiner) + len(p) for p in missing)
        if missing and (tok == special.eos or room <= need):
            s.forced = [*special.joiner, *missing[0]]
            tok = s.forced.pop(0)
        elif tok == special.eos or room <= 0:
            s.done = True
            return special.eos
    s.append(tok, banned, token_text)
    return tok


def _run(step: Callable[..., Any], seqs: list[_Seq], settings: Settings, special: Special,
         banned: BannedTerms | None, token_text: Callable[[int], str] | None, device: Any) -> None:
    logits, (cache, mask), lengths = _prefill(step, seqs, device)
    limit = settings.max_new_tokens + max((sum(len(special.joiner) + len(p) for p in s.prompt.must_include)
                                           for s in seqs), default=0)
    active = list(seqs)                                            # the batch's rows, in order
    seen = _seen([s.out for s in active], logits.shape[-1], logits.device)
    for t in range(limit + 1):
        choice = _choose(logits, seen, active, settings, special, banned)
        fed = [special.pad if s.done else _advance(s, c, settings, special, banned, token_text)
               for s, c in zip(active, choice)]
        keep = [r for r, s in enumerate(active) if not s.done]
        if not keep:
            break
        if len(active) - len(keep) >= max(1, len(active) // 8):  # finished rows leave the batch (a few at a time)
            idx = torch.tensor(keep, device=device)
            cache, mask, seen = _select(cache, idx), mask.index_select(0, idx), seen.index_select(0, idx)
            lengths = lengths[keep]
            active, fed = [active[r] for r in keep], [fed[r] for r in keep]
        ids = torch.tensor(fed, device=device)[:, None]
        seen[torch.arange(len(fed), device=seen.device), ids[:, 0].to(seen.device)] = True
        pos = (lengths + t).to(device)[:, None]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.bool, device=device)], 1)
        logits, cache = step(ids, cache, pos, mask)
        logits = logits[:, -1].float()


def _normalized(b: _Seq) -> float:
    """A beam's length-normalized log-probability, the score beams are ranked by."""
    return b.score / max(len(b.out), 1) ** 0.7


def _beam(step: Callable[..., Any], prompt: Prompt, settings: Settings, special: Special,
          banned: BannedTerms | None, token_text: Callable[[int], str] | None, device: Any) -> list[list[int]]:
    """Beam search for one prompt (beams share its prefill); length-normalized log-probability; the n best."""
    width = settings.beam_width
    logits, (cache, mask), lengths = _prefill(step, [_Seq(prompt)], device)
    beams = [_Seq(prompt)]
    finished: list[_Seq] = []
    for t in range(settings.max_new_tokens):
        seen = _seen([b.out for b in beams], logits.shape[-1], logits.device)
        logp = _mask(torch.log_softmax(_penalize(logits, seen, settings.repetition_penalty), -1),
                     beams, settings, special, banned)
        total = logp + torch.tensor([b.score for b in beams], device=logp.device)[:, None]
        top = total.flatten().topk(min(2 * width, total.numel()))
        new, keep = [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            r, tok = divmod(flat, logp.shape[1])
            if score == float("-inf"):
                break
            b = beams[r]
            child = _Seq(prompt, b.state, b.astate)
            child.out, child.written, child.score = list(b.out), list(b.written), score
            if tok == special.eos:
                finished.append(child)
                continue
            child.append(tok, banned, token_text)
            new.append(child)
            keep.append(r)
            if len(new) == width:
                break
        if not new:
            break
        if len(finished) >= width:
            # Done when no live beam ranks above the width-th best ended one (length-normalized: a live beam's
            # rank can still rise). Stopping at `width` ended beams returned the step before's live beams, cut off
            # mid-text, above their own continuations.
            finished = sorted(finished, key=_normalized, reverse=True)[:width]
            if max(_normalized(b) for b in new) <= _normalized(finished[-1]):
                break
        beams = new
        idx = torch.tensor(keep, device=device)
        cache = _select(cache, idx)
        mask = torch.cat([mask.index_select(0, idx), torch.ones((len(keep), 1), dtype=torch.bool, device=device)], 1)
        ids = torch.tensor([b.out[-1] for b in beams], device=device)[:, None]
        pos = (lengths[:1].expand(len(beams)) + t).to(device)[:, None]
        logits, cache = step(ids, cache, pos, mask)
        logits = logits[:, -1].float()
    else:
        finished.extend(beams)      # max_new_tokens reached: the beams still going end here
    if not finished:                # every continuation banned at the first step
        finished = beams
    best = sorted(finished, key=_normalized, reverse=True)[:settings.n]
    out = []
    for b in best:                          # must-include phrases missing from a beam: continued greedily
        missing = b.missing()
        if missing:
            # from the same prompt, the beam's tokens, the joiner and the phrase fed as forced tokens: the prompt
            # stays the model's input (an encoder-decoder must not see generated text as its source)
            cont = _Seq(prompt)
            cont.forced = [*b.out, *special.joiner, *missing[0]]
            rest = Settings(strategy="greedy", repetition_penalty=settings.repetition_penalty,
                            max_new_tokens=settings.max_new_tokens + len(special.joiner) + len(missing[0]))
            _run(step, [cont], rest, special, banned, token_text, device)
            b.out = cont.out
        out.append(b.out)
    return out
