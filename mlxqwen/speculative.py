"""Speculative decoding with the model's own MTP head: exact acceptance, and the depth that pays.

The head guesses k tokens (drawn through the request's own sampler from the head's logits: the
distribution q); the model then reads the next token and the k guesses in one pass, which gives
its own distribution p at each of those positions (processed alike: penalties, temperature,
top-k, top-p, min-p). A guess d is kept with probability min(1, p(d) / q(d)); the first one
refused is replaced by a draw from the normalized residual max(p - q, 0); when all are kept, one
more token comes from p at the last position. The tokens are then distributed exactly as plain
decoding's (Leviathan et al., 2023; Chen et al., 2023). Greedy keeps a guess when it is the
model's argmax, so its output is the same token for token.

How many tokens to guess (0 to 3; 0 is plain decoding) is chosen by `DepthChooser` from the
acceptance measured so far and the measured time of a step at each depth on this machine: a
pass over 4 tokens costs about what a pass over 1 does on a bandwidth-bound GPU, but 4 times as
much on a CPU, where guessing would only lose."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from .sampling import Sampler

MAX_DEPTH = 3
HEAD_RECENT = 128  # tokens the MTP head still reads after a stretch without guesses


def accept(sampler: Sampler, logits: mx.array, guesses: list[int], drafts: list[mx.array]) -> tuple[list[int], int]:
    """The tokens that follow, given the model's logits [k+1, vocab] over the next token and the k
    `guesses`, and the distributions `drafts` they were drawn from. Returns the accepted guesses
    plus one more token, and how many guesses were accepted; the sampler records them."""
    k = len(guesses)
    if sampler.greedy:  # a guess is kept when it is the model's argmax
        best = mx.argmax(logits, axis=-1).tolist()
        n = next((j for j in range(k) if guesses[j] != best[j]), k)
        return guesses[:n] + [best[n]], n
    if sampler.penalized:  # each position's distribution depends on the guesses kept before it
        return _accept_in_turn(sampler, logits, guesses, drafts)
    # Otherwise every test is decided in one evaluation (each one apart is a sync with the device).
    p = [sampler.distribution(logits[j]) for j in range(k + 1)]
    ids = mx.array(guesses)
    u = mx.stack([sampler.uniform() for _ in range(k)])
    kept = u * mx.stack(drafts)[mx.arange(k), ids] <= mx.stack(p[:k])[mx.arange(k), ids]
    last = sampler.draw_from(p[k])
    mx.eval(kept, last)
    n = next((j for j, ok in enumerate(kept.tolist()) if not ok), k)
    if n == k:
        return guesses + [last.item()], k
    residual = mx.maximum(p[n] - drafts[n], 0.0)
    return guesses[:n] + [sampler.draw_from(residual / residual.sum()).item()], n


def _accept_in_turn(
    sampler: Sampler, logits: mx.array, guesses: list[int], drafts: list[mx.array]
) -> tuple[list[int], int]:
    tokens = []
    for j, (guess, q) in enumerate(zip(guesses, drafts, strict=True)):
        p = sampler.distribution(logits[j])
        if sampler.params.temperature == 0:
            kept = guess == int(mx.argmax(p))
        else:
            kept = float(sampler.uniform()) * float(q[guess]) <= float(p[guess])
        if not kept:
            residual = mx.maximum(p - q, 0.0) if sampler.params.temperature else p
            token = int(sampler.draw_from(residual / residual.sum()))
            sampler.record(token)
            return tokens + [token], j
        sampler.record(guess)
        tokens.append(guess)
    token = int(sampler.draw_from(sampler.distribution(logits[len(guesses)])))
    sampler.record(token)
    return tokens + [token], len(guesses)


@dataclass
class DepthChooser:
    """Picks the depth with the most tokens per second: expected tokens per step (from the
    acceptance rate at each guess position) over the seconds per step at that depth and batch size:
    the fastest of its last `window` steady steps, since what else runs on the machine only ever
    adds time. A step is steady when the one before it ran at the same depth and batch size: the
    first after a change costs more (new shapes the first time; then the other depth's work still
    in the caches), and counting it made a depth that is only ever probed look dearer than it is.
    Each depth is measured first (two steady steps); then now and then the other depth measured
    longest ago is measured again, for two steps, so the choice follows the machine and the text:
    after `probe` steps at least, and after as many as keep what such steps cost beyond steps at the
    best depth within `probe_share` of the time (a depth-3 step of the MTP head can cost several
    plain steps). Once every depth has half a window of steps, each probe that leaves the best
    depth as it was doubles the wait, `most_doublings` times at most. `fixed` pins it."""

    max_depth: int = MAX_DEPTH
    fixed: int | None = None
    probe: int = 32
    probe_share: float = 0.02
    most_doublings: int = 5
    window: int = 8
    times: dict[tuple[int, int], deque[float]] = field(default_factory=dict)  # (depth, batch) -> steady steps' seconds
    measured: dict[tuple[int, int], int] = field(default_factory=dict)  # (depth, batch) -> the step last run
    accepted: list[float] = field(default_factory=lambda: [0.0] * MAX_DEPTH)  # guess j kept, given j-1 were
    proposed: list[float] = field(default_factory=lambda: [0.0] * MAX_DEPTH)
    steps: int = 0
    probed: int = 0  # the step of the last probe
    confirmed: int = 0  # probes in a row that left the best depth as it was
    probing: int | None = None  # the depth a probe runs again, for its steady step
    best: int | None = None
    previous: tuple[int, int] | None = None  # (depth, batch) of the last step

    def acceptance(self, j: int) -> float:
        return self.accepted[j] / self.proposed[j] if self.proposed[j] else 0.7

    def expected(self, depth: int) -> float:
        """Tokens a step at `depth` gives on average (the last one always comes)."""
        tokens, kept = 1.0, 1.0
        for j in range(depth):
            kept *= self.acceptance(j)
            tokens += kept
        return tokens

    def choose(self, batch: int) -> int:
        if self.fixed is not None:
            return self.fixed
        self.steps += 1
        if self.probing is not None:
            depth, self.probing = self.probing, None
            return depth
        depths = range(self.max_depth + 1)
        untried = [d for d in depths if len(self.times.get((d, batch), ())) < 2]  # one step may be unlucky
        if untried:
            return untried[0]
        seconds = {d: min(self.times[d, batch]) for d in depths}
        best = max(depths, key=lambda d: self.expected(d) / seconds[d])
        if best != self.best:
            self.best, self.confirmed = best, 0
        stale = min((d for d in depths if d != best), key=lambda d: self.measured[d, batch])
        extra = 2 * (seconds[stale] / seconds[best] - 1)  # what a probe costs, in steps at the best depth
        wait = max(self.probe, extra / self.probe_share) * 2 ** min(self.confirmed, self.most_doublings)
        if self.steps - self.probed < wait:
            return best
        self.probed, self.probing = self.steps, stale
        if all(len(self.times[d, batch]) >= self.window // 2 for d in depths):  # estimates to trust
            self.confirmed += 1
        return stale

    def record(self, depth: int, batch: int, seconds: float | None, kept: list[int] = ()) -> None:
        """A step at `depth` over `batch` sequences took `seconds` (None: other work ran in that time);
        `kept`: guesses accepted per sequence."""
        for n in kept:
            for j in range(min(n + 1, depth)):
                self.proposed[j] = 0.95 * self.proposed[j] + 1
                self.accepted[j] = 0.95 * self.accepted[j] + (j < n)
        key = (depth, batch)
        if seconds is not None and key == self.previous:
            self.times.setdefault(key, deque(maxlen=self.window)).append(seconds)
        self.previous = key
        self.measured[key] = self.steps
