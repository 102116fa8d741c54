"""When a speculative engine should not speculate: plain steps chosen from what the server measured.

Algorithm 1 picks the best of the speculative rounds, and every one of them drafts; a plain step
(one token per request; the draft's inputs for the new position wait in the core's stash) is the
option it lacks. Per row bucket the gate keeps moving means of the tokens its rounds commit per live
row (τ̄) and of the wall seconds of its rounds and of its plain steps as the scheduler times them,
and runs plain steps while τ̄ · t_plain < t_round. The choice reads only steps already read back,
never the tokens of the step it decides, and both programs are lossless, so outputs keep the
target's law. After PROBE_EVERY steps of one kind in a row it runs a probe of PROBE_LEN steps of the
other, to keep both times and τ̄ current (acceptance moves with the batch's requests): always rounds
among plain steps, and plain steps among rounds only near the break-even (τ̄ · t_plain < NEAR ·
t_round), where a stale plain time could be hiding a better choice; past it, plain steps would only
cost tokens. A bucket whose plain time is unknown runs a probe to learn it. A probe is two steps
long because the scheduler times a step only when the next launch is of the same kind: a step's
measured time holds the host's launch of the next one, and a round's launch (two programs after
plain steps: the stash's flush and the round) costs more than a plain step's; single plain steps
among rounds measured 8.4 ms at one row in a served run where bench_steps gives 4.4 ms (H200,
2026-12-03).

Several processes (dspark_jax.engine.lockstep): only the leader's clock counts. The leader's gate
keeps its timings in an outbox for the broadcast; the followers `observe_seconds` them.
"""

from __future__ import annotations

PROBE_EVERY = 16  # steps of one kind in a row before a probe of the other re-measures it
PROBE_LEN = 2  # steps a probe runs: the scheduler times a step only when the next one is of its kind
NEAR = 1.5  # rounds re-measure plain steps only while τ̄ · t_plain < NEAR · t_round
WEIGHT = 0.125  # weight of the newest observation in a moving mean


def _moving(means: dict, key, value: float) -> None:
    means[key] = value if key not in means else means[key] + WEIGHT * (value - means[key])


class PlainGate:
    def __init__(self):
        self.tau: dict[int, float] = {}  # by row bucket: committed tokens per live row and round
        self.seconds: dict[tuple[int, bool], float] = {}  # by (row bucket, plain): seconds of a step
        # by row bucket: (plain, steps of that kind in a row, whether they are a probe)
        self.streak: dict[int, tuple[bool, int, bool]] = {}
        self.outbox: list | None = None  # a list: keep the observed timings for `take_timings`

    def choose(self, rows: int) -> bool:
        """Whether the next step over `rows` rows (a row bucket) runs plain."""
        tau, plain_s, round_s = self.tau.get(rows), self.seconds.get((rows, True)), self.seconds.get((rows, False))
        last, run, probing = self.streak.get(rows, (False, 0, False))
        probe = False
        if probing and run < PROBE_LEN:
            plain = last
        elif tau is None or round_s is None:
            plain = False
        elif plain_s is None:
            plain = probe = True
        else:
            plain = tau * plain_s < round_s
            if plain == last and run >= PROBE_EVERY and (plain or tau * plain_s < NEAR * round_s):
                plain, probe = not plain, True
        self.streak[rows] = (plain, run + 1, probing) if plain == last else (plain, 1, probe)
        return plain

    def observe_round(self, rows: int, tau: float) -> None:
        """A round over `rows` rows committed `tau` tokens per live row (accepted drafts + 1)."""
        _moving(self.tau, rows, tau)

    def observe_seconds(self, rows: int, plain: bool, seconds: float) -> None:
        _moving(self.seconds, (rows, plain), seconds)
        if self.outbox is not None:
            self.outbox.append([rows, plain, seconds])

    def take_timings(self) -> list:
        """The timings observed since the last call (for the followers), oldest first."""
        taken, self.outbox = self.outbox or [], [] if self.outbox is not None else None
        return taken

    def state(self) -> tuple:
        """Everything `choose` reads (for the lockstep fingerprint)."""
        return sorted(self.tau.items()), sorted(self.seconds.items()), sorted(self.streak.items())
