"""Banned terms, enforced while generating text and checked after.

`BannedTerms(terms)` is an Aho-Corasick automaton over characters (a trie with failure links): as a generator emits
tokens, the automaton follows the text and knows, for its current state, which tokens of the vocabulary would
complete a banned term. Those tokens are masked before the next token is chosen, so a banned term can never be
written, whether a tokenizer emits it one character at a time or merged into longer tokens (each token's characters
are walked through the automaton). `find(text)` is the check after generation.

The terms are data: `conf/compliance/*.txt`, one per line (`#` starts a comment), which a user can edit.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable


def load_terms(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        terms = [line.split("#", 1)[0].strip() for line in fh]
    return sorted({t for t in terms if t})


class BannedTerms:
    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = sorted({t for t in terms if t})
        self.goto: list[dict[str, int]] = [{}]
        self.fail: list[int] = [0]
        self.out: list[bool] = [False]                 # does reaching this state complete a banned term?
        for term in self.terms:
            s = 0
            for ch in term:
                if ch not in self.goto[s]:
                    self.goto.append({})
                    self.fail.append(0)
                    self.out.append(False)
                    self.goto[s][ch] = len(self.goto) - 1
                s = self.goto[s][ch]
            self.out[s] = True
        queue = deque(self.goto[0].values())
        while queue:
            s = queue.popleft()
            for ch, t in self.goto[s].items():
                queue.append(t)
                f = self.fail[s]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[t] = self.goto[f].get(ch, 0) if self.goto[f].get(ch, 0) != t else 0
                self.out[t] = self.out[t] or self.out[self.fail[t]]
        self._banned_cache: dict[int, list[int]] = {}
        self._vocab: TokenIndex | None = None

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def walk(self, state: int, text: str) -> tuple[int, bool]:
        """(state after `text`, whether a banned term was completed on the way)."""
        hit = False
        for ch in text:
            state = self.step(state, ch)
            hit = hit or self.out[state]
        return state, hit

    def find(self, text: str) -> list[str]:
        """The banned terms that occur in `text`."""
        return [t for t in self.terms if t in text]

    def bind(self, vocab: "TokenIndex | list[str]") -> "BannedTerms":
        """Attach a vocabulary (a `TokenIndex`, or id -> the characters the token writes, "" for special tokens)."""
        self._vocab = vocab if isinstance(vocab, TokenIndex) else TokenIndex(vocab)
        self._banned_cache = {}
        return self

    def banned_tokens(self, state: int) -> list[int]:
        """Token ids that would complete a banned term from `state` (cached per state).

        A one-character token completes a term only if its character has a transition somewhere on the failure
        chain of `state` (otherwise the automaton falls back to the root and completes nothing), so only those
        characters are tried; tokens of several characters are walked in full."""
        if self._vocab is None:
            raise RuntimeError("BannedTerms.bind(vocabulary) first")
        if state not in self._banned_cache:
            chars: set[str] = set()
            f = state
            while True:
                chars.update(self.goto[f])
                if not f:
                    break
                f = self.fail[f]
            bad = [i for ch in chars if self.out[self.step(state, ch)] for i in self._vocab.single.get(ch, ())]
            bad += [i for i, text in self._vocab.multi if self.walk(state, text)[1]]
            self._banned_cache[state] = sorted(bad)
        return self._banned_cache[state]


class TokenIndex:
    """A vocabulary as the automata need it: one-character tokens by character, longer tokens listed. Built once per
    tokenizer and shared by every `BannedTerms` bound to it."""

    def __init__(self, token_text: list[str]) -> None:
        self.size = len(token_text)
        self.single: dict[str, list[int]] = {}
        self.multi: list[tuple[int, str]] = []
        for i, text in enumerate(token_text):
            if len(text) == 1:
                self.single.setdefault(text, []).append(i)
            elif text:
                self.multi.append((i, text))
