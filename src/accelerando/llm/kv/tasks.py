"""Synthetic long-context retrieval tasks (RULER-like), generated in code from the offline corpus.

A sample is a haystack of real code (the zoo's corpus) of ``n`` tokens with needles inserted at
chosen depths, then a query whose answer is the needle's value (RULER: Hsieh et al., 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?"):

- ``passkey``: one needle line ``#@ passkey lemon river``; query: the needle's prefix again
  (``#@ passkey``) -> `` lemon river`` (associative recall: find the key, copy its value).
- ``multikey``: ``k`` needles ``#@ <key> <value>`` with distinct keys, one queried (the others
  are distractors, the needle-in-a-haystack multi-key variant).

The format is chosen so that a tiny model can learn it: a distinctive marker (``#@``, rare in
code), keys and value words that are single tokens of the tokenizer's vocabulary (its lowercase
words that the haystack rarely holds) and the value right after the key, so that induction (match
the key, copy what followed it; then match the copied word, copy the next) answers the query.
Values are words, not digits: digit tokens recur in every value, so copying the second of them
by its predecessor is ambiguous (a 2-layer model trained at 128 tokens found the first token 95%
of the time and the whole 5-digit value 45%). Needles are tokenised piece by piece, so the
answer's ids are exactly the ids that followed the key in the haystack.

Everything is token-level (exact lengths) and seeded by a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TASKS = ("passkey", "multikey")


@dataclass(frozen=True)
class RetrievalSample:
    """One task instance: `prompt` (1-D ids, ends right before the answer), `answer` (1-D ids),
    `answer_text`, and the queried needle's `depth` in [0, 1]."""
    prompt: torch.Tensor
    answer: torch.Tensor
    answer_text: str
    depth: float
    task: str


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=gen))


VALUE_WORDS = 2


MARKER = "\n#@"
PASSKEY = " passkey"


def key_names(tokenizer: Any) -> list[str]:
    """The tokenizer's single-token lowercase words (`` name``, >= 4 letters): the multi-key keys."""
    out = []
    for i in sorted(tokenizer.get_vocab().values()):
        w = tokenizer.decode([i])
        if (len(w) >= 5 and w[0] == " " and w[1:].isascii() and w[1:].isalpha() and w[1:].islower()
                and tokenizer(w, add_special_tokens=False)["input_ids"] == [i]):
            out.append(w)
    return out


class HaystackBuilder:
    """Builds retrieval samples over one tokenised corpus stream (`filler`, 1-D ids)."""

    def __init__(self, tokenizer: Any, filler: torch.Tensor) -> None:
        if filler.ndim != 1 or len(filler) < 64:
            raise ValueError("filler must be a 1-D token stream of at least 64 tokens")
        self.tok = tokenizer
        self.filler = filler
        self.eos = tokenizer.eos_token_id
        # keys the haystack rarely holds (< 1 per 2048 tokens): a key met in the code too would be ambiguous
        freq = torch.bincount(filler, minlength=len(tokenizer)).double() * 2048 / len(filler)
        self.names = [w for w in key_names(tokenizer)
                      if freq[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0]] < 1.0]
        if len(self.names) < 16:
            raise ValueError(f"the tokenizer has only {len(self.names)} single-token words for keys (need 16)")

    def _value(self, gen: torch.Generator, *, avoid: list[str]) -> str:
        """Two distinct key-vocabulary words, none of them a key (``"lemon river"``)."""
        out: list[str] = []
        while len(out) < VALUE_WORDS:
            w = self.names[_randint(gen, 0, len(self.names))]
            if w not in out and w not in avoid:
                out.append(w)
        return "".join(out)[1:]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def sample(self, task: str, n: int, *, gen: torch.Generator, depth: float | None = None,
               n_keys: int = 4, n_queries: int = 1) -> tuple[list[int], list[tuple[int, int]], RetrievalSample]:
        """A sample of total prompt length ``n`` tokens. Returns (full ids incl. answers, answer spans
        [(start, end)) in those ids, the first query as a RetrievalSample). ``n_queries`` > 1 appends
        further queries (training: more supervised answers per sequence)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        k = 1 if task == "passkey" else max(1, n_keys)
        names: list[str] = []
        while len(names) < k:
            nm = PASSKEY if task == "passkey" else self.names[_randint(gen, 0, len(self.names))]
            if nm not in names:
                names.append(nm)
        values = [self._value(gen, avoid=names) for _ in range(k)]
        key_ids = [self._ids(MARKER + nm) for nm in names]
        val_ids = [self._ids(" " + v) for v in values]
        q_post = self._ids("\n")
        needles = [k_ + v_ + q_post for k_, v_ in zip(key_ids, val_ids)]
        order = torch.randperm(k, generator=gen).tolist()
        queried = order[: max(1, min(n_queries, k))] if task != "passkey" else [0] * max(1, n_queries)
        q_pre = [key_ids[i] for i in queried]
        q_ans = [val_ids[i] for i in queried]
        # prompt = [eos] + haystack(with needles) + q_pre[0]; later queries follow answer 0
        tail = len(q_pre[0])
        n_hay = n - 1 - tail - sum(len(x) for x in needles)
        if n_hay < 8:
            raise ValueError(f"context n={n} too short for task {task!r}")
        start = _randint(gen, 0, len(self.filler) - n_hay - 1)
        hay = self.filler[start: start + n_hay].tolist()
        # needle insertion points (in haystack tokens): the queried one at `depth`
        cuts = sorted(_randint(gen, 0, n_hay + 1) for _ in range(k))
        if depth is not None:
            cuts[0] = int(round(depth * n_hay))
            cuts = [cuts[0]] + sorted(cuts[1:])
            place = {queried[0]: cuts[0]}
            rest = [i for i in range(k) if i != queried[0]]
            place.update({i: c for i, c in zip(rest, cuts[1:])})
        else:
            place = {i: c for i, c in zip(range(k), cuts)}
        ids: list[int] = [self.eos]
        pos_of: dict[int, int] = {}
        prev = 0
        for i in sorted(range(k), key=lambda j: (place[j], j)):
            ids.extend(hay[prev: place[i]])
            pos_of[i] = len(ids)
            ids.extend(needles[i])
            prev = place[i]
        ids.extend(hay[prev:])
        ids.extend(q_pre[0])
        prompt_len = len(ids)
        spans = [(len(ids), len(ids) + len(q_ans[0]))]
        ids.extend(q_ans[0])
        ids.extend(q_post)
        for p, a in zip(q_pre[1:], q_ans[1:]):
            ids.extend(p)
            spans.append((len(ids), len(ids) + len(a)))
            ids.extend(a)
            ids.extend(q_post)
        d = pos_of[queried[0]] / max(1, prompt_len)
        s = RetrievalSample(prompt=torch.tensor(ids[:prompt_len]), answer=torch.tensor(q_ans[0]),
                            answer_text=values[queried[0]], depth=d, task=task)
        return ids, spans, s

    def training_sequence(self, seq_len: int, *, gen: torch.Generator,
                          max_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, answer_mask), each ``seq_len + 1`` long: a multi-query retrieval sample (1 to
        ``max_keys`` keys, default seq_len // 40; every key queried, needle depths uniform), padded
        with haystack to the same length; ``answer_mask`` marks the answer tokens (training weights
        them up: multi-query associative recall makes copying a dense signal)."""
        task = "passkey" if _randint(gen, 0, 8) == 0 else "multikey"
        k = _randint(gen, 1, (max_keys or max(2, seq_len // 40)) + 1)
        q_room = 12 * k + 8                      # room for the queries after the prompt
        ids, spans, _ = self.sample(task, seq_len + 1 - q_room, gen=gen, n_keys=k,
                                    n_queries=1 if task == "passkey" else k)
        if len(ids) < seq_len + 1:
            s = _randint(gen, 0, len(self.filler) - seq_len)
            ids = ids + [self.eos] + self.filler[s: s + seq_len + 1 - len(ids) - 1].tolist()
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for a, b in spans:
            mask[a:b] = True
        return torch.tensor(ids[: seq_len + 1]), mask[: seq_len + 1]


@torch.no_grad()
def retrieval_exact_match(generate_fn: Any, samples: list[RetrievalSample]) -> float:
    """Fraction of samples whose greedy continuation (``generate_fn(prompt_ids, n_new) -> new ids``)
    starts with the answer's text."""
    if not samples:
        raise ValueError("no samples")
    hits = 0
    for s in samples:
        new = generate_fn(s.prompt, len(s.answer) + 1)
        hits += int(new[: len(s.answer)].tolist() == s.answer.tolist())
    return hits / len(samples)


def corpus_filler(tokenizer: Any, split: str = "train") -> torch.Tensor:
    """The zoo's code corpus of `split` as one token stream (documents joined by EOS)."""
    from accelerando.zoo import data as zoo_data
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in zoo_data.texts("code", split):
        ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)
