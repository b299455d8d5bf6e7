"""How many tokens a chain drafter proposes per step: fixed, transformers' heuristic, or cost-aware.

``DraftLength`` is what ``DraftModel`` / ``PromptLookup`` hold: it picks k before a proposal,
times the draft (propose) and the verification (propose's end to accept), and feeds the counts to
its controller. A controller has ``choose() -> k`` and ``update(k, n_accepted_per_row, t_draft,
t_target)``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

import torch


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per verification with k drafts and per-token acceptance alpha:
    (1 - alpha^(k+1)) / (1 - alpha)  (Leviathan et al., eq. 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float, cost_ratio: float, k_max: int, k_min: int = 0) -> int:
    """argmax_k expected_tokens(alpha, k) / (1 + k c): tokens per unit of time when a draft
    token costs c target forwards (c = draft time per token / target verification time)."""
    return max(range(k_min, k_max + 1), key=lambda k: (expected_tokens(alpha, k) / (1.0 + k * cost_ratio), -k))


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def choose(self) -> int:
        return self.k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        pass


class HeuristicK:
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 if all drafts accepted, else -1."""

    def __init__(self, k0: int = 5, k_max: int = 32):
        self.k, self.k_max = k0, k_max

    def choose(self) -> int:
        return self.k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        if k == 0:
            return
        self.k = min(self.k_max, self.k + 2) if min(n_host) == k else max(1, self.k - 1)


class AdaptiveK:
    """Cost-aware draft length: k = argmax_k E(a, k) / (k c t + t_v(k)), k in [0, k_max], where
    E(a, k) = (1 - a^(k+1)) / (1 - a) is the expected tokens of a step (Leviathan et al., eq. 1).

    alpha: running (exponentially weighted) estimate of per-token acceptance from the truncated
    geometric counts -- a step that accepted n of k drafts is n successes and (n < k) failures.
    c: running estimate of (draft time per drafted token) / (the step's verification time), measured
    with the wall clock; ``cost_ratio`` fixes c instead (e.g. 0 for prompt lookup).
    t_v(k): the measured wall time of a step's verification and bookkeeping with k drafts (running
    averages per k, linear in k between and beyond the measured ones; t = their mean over k > 0).
    Until a plain step (k = 0) has been timed, t_v is taken as the same for every k, which is the
    classic rule argmax E(a, k) / (1 + k c) (``best_k``). k = 0 -- plain decoding on the same
    engine -- wins when drafting does not pay (a poor draft, or verification that costs more per
    token than it returns, as for wide steps on a CPU); every ``probe_every``-th such step drafts
    one token anyway so alpha and the costs keep being measured (a quarter as often after each probe
    that leaves k = 0 best, and rarely enough that the probes' measured extra cost stays ~3% of
    plain decoding's time, down to every 128th step; back to ``probe_every`` once drafting pays).

    t_v(k) and c are medians of their last ``WINDOW`` readings, not running means: one step of a
    sub-millisecond model is noisy (a hiccup, a compile) and a single reading used to decide 20-60
    losing drafting steps. Drafting must beat plain decoding's measured rate by ``MARGIN`` (10%).

    Never losing to plain decoding (issue 22) is mostly about the first steps and the idle ones:
    ``plain_run`` asks the loop for a run of ``FIRST_PLAIN`` plain steps before any drafting (so
    t_v(0) is measured, not assumed, as k = 0 then runs: one plain step alone pays a host sync and
    overstated t_v(0) by ~1.7x) and, while k = 0 is best, for the whole run of plain steps up to the next probe, which
    the loop then takes as plain decoding with no drafter work per token. Drafting starts slowly:
    k <= 2 n + 1 for the longest run of n accepted drafts seen so far (k = 1 first), so a draft
    that never agrees costs a few one-token probes, not k_max-wide steps.
    """

    def __init__(self, k_max: int = 12, *, k_min: int = 0, alpha0: float = 0.6, decay: float = 0.9,
                 cost_ratio: float | None = None, c0: float = 0.2, probe_every: int = 8):
        if not 0 <= k_min <= k_max or k_max < 1:
            raise ValueError(f"need 0 <= k_min <= k_max and k_max >= 1, got {k_min}, {k_max}")
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.k_max, self.k_min, self.decay, self.fixed_c = k_max, k_min, decay, cost_ratio
        self.succ, self.fail = 2.0 * alpha0, 2.0 * (1 - alpha0)     # a weak prior worth 2 drafts
        self.ramp = 1                                                 # slow start: k <= 2 (longest accepted run) + 1
        self.c = c0 if cost_ratio is None else cost_ratio
        self._c_seen: deque[float] = deque(maxlen=self.WINDOW)        # recent c readings (median: c)
        self.t_verify: dict[int, float] = {}                          # k -> median of recent t_v(k) readings
        self._t_seen: dict[int, deque[float]] = {}
        self.probe_every, self._idle = probe_every, 0
        self._base_probe, self._probing = probe_every, False
        self.history: list[int] = []

    @property
    def alpha(self) -> float:
        return self.succ / max(1e-9, self.succ + self.fail)

    def verify_time(self, k: int) -> float | None:
        """t_v(k): measured, else linear in k through the nearest measured ks (None: nothing yet)."""
        pts = sorted(self.t_verify.items())
        if not pts:
            return None
        if k in self.t_verify:
            return self.t_verify[k]
        if len(pts) == 1:
            return pts[0][1]
        lo = [p for p in pts if p[0] < k]
        hi = [p for p in pts if p[0] > k]
        (k0, t0), (k1, t1) = (lo[-1], hi[0]) if lo and hi else (pts[-2], pts[-1]) if lo else (pts[0], pts[1])
        return max(min(t for _, t in pts) * 0.5, t0 + (t1 - t0) * (k - k0) / (k1 - k0))

    def rate(self, k: int) -> float:
        """Expected tokens per unit of time with k drafts."""
        a = min(self.alpha, 0.999)
        drafted = [t for j, t in self.t_verify.items() if j > 0]
        if 0 not in self.t_verify or not drafted:
            return expected_tokens(a, k) / (1.0 + k * self.c)
        t = sum(drafted) / len(drafted)
        return expected_tokens(a, k) / (k * self.c * t + self.verify_time(k))

    WINDOW = 9          # t_v(k) and c are medians of this many recent readings (one reading is noise)
    MARGIN = 0.1        # drafting must beat plain decoding's measured rate by this share
    FIRST_PLAIN = 4     # plain steps timed before any drafting: a run, as k = 0 then runs

    def _best(self) -> int:
        hi = max(self.k_min, min(self.k_max, self.ramp))
        k = max(range(self.k_min, hi + 1), key=lambda j: (self.rate(j), -j))
        measured = 0 in self.t_verify and any(j > 0 for j in self.t_verify)
        if k > 0 and self.k_min == 0 and measured and self.rate(k) < (1.0 + self.MARGIN) * self.rate(0):
            return 0     # hysteresis: a gain within the timing noise is no gain
        return k

    def _record(self, k: int, t: float) -> None:
        seen = self._t_seen.setdefault(k, deque(maxlen=self.WINDOW))
        seen.append(t)
        self.t_verify[k] = statistics.median(seen)

    def plain_run(self) -> int:
        """Plain steps the loop should take now, before the next ``choose`` (0: draft now): one
        to time a plain step first, else, while k = 0 is best, those left until the next probe."""
        if self.k_min > 0:
            return 0
        if 0 not in self.t_verify:
            return min(self.FIRST_PLAIN, self.probe_every)
        if self._best() > 0:
            return 0
        return max(0, self.probe_every - self._idle)

    def update_plain(self, n: int, seconds: float) -> None:
        """``n`` plain steps ran in ``seconds`` (loop included), as asked by ``plain_run``."""
        if n > 0:
            self._record(0, seconds / n)
            self._idle += n
            self.history += [0] * n

    def choose(self) -> int:
        k, self._probing = self._best(), False
        if k == 0:
            self._idle += 1
            if self._idle >= self.probe_every:
                k, self._idle, self._probing = 1, 0, True
        else:
            self._idle = 0
        self.history.append(k)
        return k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        if t_target > 0:
            self._record(k, t_target)
        if k == 0:
            return
        s = float(sum(n_host))
        f = float(sum(1 for n in n_host if n < k))
        self.succ = self.decay * self.succ + s
        self.fail = self.decay * self.fail + f
        if self.fixed_c is None and t_target > 0:
            self._c_seen.append((t_draft / k) / t_target)
            self.c = statistics.median(self._c_seen)
        self.ramp = max(self.ramp, 2 * max(n_host, default=0) + 1)
        if self._probing:   # a probe that changes nothing: probe at most a quarter as often
            self.probe_every = self._next_probe(t_draft + t_target) if self._best() == 0 else self._base_probe

    PROBE_SHARE = 0.03      # a useless draft's probes may cost this share of plain decoding's time
    MAX_PROBE_EVERY = 128

    def _next_probe(self, t_probe: float) -> int:
        """Plain steps until the next probe: 4x the last interval, and at least enough that a
        probe's extra cost over the plain step it replaces is ``PROBE_SHARE`` of the interval's
        time (a draft forward and a 2-wide verification can cost several plain steps on a CPU);
        at most ``MAX_PROBE_EVERY``."""
        t0 = self.t_verify.get(0)
        need = 0 if not t0 else math.ceil(max(0.0, t_probe - t0) / (self.PROBE_SHARE * t0))
        return min(self.MAX_PROBE_EVERY, max(4 * self.probe_every, need))


def make_controller(k: int | str, k_max: int, cost_ratio: float | None = None):
    if k == "adaptive":
        return AdaptiveK(k_max, cost_ratio=cost_ratio)
    if k == "heuristic":
        return HeuristicK(min(5, k_max), k_max)
    return FixedK(int(k))



class DraftLength:
    """k for each step of a chain drafter (``k``: an int, ``"adaptive"`` or ``"heuristic"``), with
    the wall-clock timing the adaptive controller learns from. ``cost_ratio`` fixes its c."""

    def __init__(self, k: int | str, k_max: int, cost_ratio: float | None = None):
        check_k(k)
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        self.cap = k_max if isinstance(k, str) else k
        self.ctrl = make_controller(k, self.cap, cost_ratio)
        self._measure = isinstance(self.ctrl, AdaptiveK) and self.ctrl.fixed_c is None
        self._t0 = self._t1 = 0.0

    def choose(self, budget: int) -> int:
        """k for this step (drafts past every row's budget are wasted); starts the draft clock."""
        self._t0 = time.perf_counter()
        return max(0, min(self.ctrl.choose(), budget - 1))

    def plain_steps(self, budget: int) -> int:
        """Plain decoding steps the loop should take before the next proposal (see
        ``AdaptiveK.plain_run``; 0 for fixed and heuristic k)."""
        if not isinstance(self.ctrl, AdaptiveK):
            return 0
        return min(self.ctrl.plain_run(), budget)

    def plain_done(self, n: int, seconds: float) -> None:
        if isinstance(self.ctrl, AdaptiveK):
            self.ctrl.update_plain(n, seconds)

    def drafted(self, tokens: torch.Tensor) -> None:
        """The draft is done (tokens on device): stops the draft clock, starts the verification's."""
        if self._measure and tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)   # unavoidable for a measured c on GPU: time the draft alone
        self._t1 = time.perf_counter()

    def update(self, k: int, n_host: list[int], active: list[bool]) -> None:
        n = [h for h, a in zip(n_host, active) if a] or n_host
        self.ctrl.update(k, n, self._t1 - self._t0, time.perf_counter() - self._t1)


def check_k(k: int | str) -> None:
    if isinstance(k, str):
        if k not in ("adaptive", "heuristic"):
            raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
    elif not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
