"""PlainGate: when a speculative engine runs plain steps, from accepted lengths and step times."""

from __future__ import annotations

from dspark_jax.engine.gate import PROBE_EVERY, PROBE_LEN, PlainGate


def test_the_gate_runs_rounds_until_it_can_compare_then_the_faster_per_token():
    gate = PlainGate()
    assert not gate.choose(4)  # nothing known: speculate
    gate.observe_round(4, 2.0)
    assert not gate.choose(4)  # the round's time is unknown: a round measures it
    gate.observe_seconds(4, False, 0.010)
    assert [gate.choose(4) for _ in range(PROBE_LEN)] == [True] * PROBE_LEN  # a plain probe measures plain steps
    gate.observe_seconds(4, True, 0.006)
    assert not gate.choose(4)  # 2 tokens per 10 ms beats 1 per 6 ms
    gate.observe_round(4, 1.0)  # τ̄ = 2 + (1 − 2)/8 = 1.875: 1.875 × 6 ms > 10 ms still
    assert not gate.choose(4)
    for _ in range(8):
        gate.observe_round(4, 1.0)
    assert gate.tau[4] < 10 / 6 and gate.choose(4)  # now one token per 6 ms is faster
    assert not gate.choose(8)  # another row bucket knows nothing yet


def test_the_gate_probes_with_rounds_every_probe_every_plain_steps():
    gate = PlainGate()
    gate.observe_round(2, 1.0)
    gate.observe_seconds(2, False, 0.02)
    gate.observe_seconds(2, True, 0.01)
    choices = [gate.choose(2) for _ in range(3 * (PROBE_EVERY + PROBE_LEN))]
    assert choices == ([True] * PROBE_EVERY + [False] * PROBE_LEN) * 3


def test_the_gate_keeps_its_timings_for_a_broadcast_only_with_an_outbox():
    quiet, loud = PlainGate(), PlainGate()
    loud.outbox = []
    for gate in (quiet, loud):
        gate.observe_seconds(1, True, 0.5)
        gate.observe_seconds(1, True, 1.5)
    assert quiet.take_timings() == [] and quiet.seconds == loud.seconds == {(1, True): 0.5 + (1.5 - 0.5) / 8}
    assert loud.take_timings() == [[1, True, 0.5], [1, True, 1.5]] and loud.take_timings() == []


def test_rounds_re_measure_plain_steps_only_near_the_break_even():
    near, far = PlainGate(), PlainGate()
    for gate, tau in ((near, 2.0), (far, 3.0)):
        gate.observe_round(1, tau)
        gate.observe_seconds(1, False, 0.010)
        gate.observe_seconds(1, True, 0.006)
    # near: 2 × 6 ms > 10 ms, but within 1.5× of it; far: 3 × 6 ms = 18 ms is past 15 ms
    assert [near.choose(1) for _ in range(2 * (PROBE_EVERY + PROBE_LEN))] == ([False] * PROBE_EVERY
                                                                              + [True] * PROBE_LEN) * 2
    assert not any(far.choose(1) for _ in range(3 * PROBE_EVERY))
