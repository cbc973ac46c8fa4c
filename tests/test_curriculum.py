"""The curriculum: complexity scores and the sampler (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.method.curriculum import CurriculumConfig, CurriculumSampler, bucket_entropy, complexity_scores


def test_complexity_normalises_each_feature_and_weights_them():
    reason = np.array([10, 20, 30])
    act = np.array([5, 5, 5])  # constant: carries no order, contributes 0
    ent = np.array([2.0, 1.0, 0.0])
    scores = complexity_scores(reason, act, ent, weights=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(scores, [(0 + 0 + 1) / 3, (0.5 + 0 + 0.5) / 3, (1 + 0 + 0) / 3])
    only_reason = complexity_scores(reason, act, ent, weights=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(only_reason, [0.0, 0.5, 1.0])


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 50), st.floats(0, 10)), min_size=1, max_size=40))
def test_complexity_is_in_unit_interval(rows):
    r, a, e = map(np.array, zip(*rows, strict=False))
    scores = complexity_scores(r, a, e)
    assert scores.shape == (len(rows),)
    assert np.all(scores >= 0) and np.all(scores <= 1 + 1e-12)


def test_complexity_rejects_non_finite():
    with pytest.raises(ValueError, match="finite"):
        complexity_scores([1, 2], [1, 2], [0.1, np.nan])


def test_bucket_entropy_matches_the_full_entropy_when_nothing_is_left_in_the_tail():
    p = np.array([[0.5, 0.25, 0.25]])
    h = bucket_entropy(np.log(p), np.array([-np.inf]))
    np.testing.assert_allclose(h, [-(p * np.log(p)).sum()])
    # With a tail bucket the entropy counts the bucket once.
    h2 = bucket_entropy(np.log(np.array([[0.5, 0.25]])), np.log(np.array([0.25])))
    np.testing.assert_allclose(h2, h)


def sampler(n=20, batch=4, total_steps=20, **kw):
    cfg = CurriculumConfig(**{"c0": 0.25, "ramp": 0.5, "seed": 3, **kw})
    return CurriculumSampler(np.linspace(1.0, 0.0, n), cfg, batch_size=batch, total_steps=total_steps)


def test_competence_opens_easy_first_and_reaches_everything():
    s = sampler()
    # complexity descends with the index, so the easiest examples are the last ones.
    assert set(s.open_indices(0)) == set(range(15, 20))
    assert s.competence(0) == pytest.approx(0.25)
    assert s.competence(5) == pytest.approx(0.625)
    assert s.competence(10) == 1.0 and s.competence(1000) == 1.0
    assert set(s.open_indices(10)) == set(range(20))
    sq = sampler(schedule="sqrt")
    assert sq.competence(0) == pytest.approx(0.25) and sq.competence(5) > s.competence(5)
    for _ in range(3):
        assert set(s.next_batch()) <= set(s.open_indices(s.step - 1))


def test_open_set_never_smaller_than_a_batch():
    s = sampler(n=20, batch=8)  # c0 * n = 5 < 8
    assert len(s.open_indices(0)) == 8
    assert len(set(s.next_batch())) == 8


def test_the_ramp_is_a_fraction_of_the_run_so_every_run_opens_all_its_data():
    # The old default (ramp over 100 steps) never opened half the data of a 30-step run.
    for total in (3, 30, 2000):
        s = sampler(total_steps=total, c0=0.3)
        assert s.competence(-(-total // 2)) == 1.0 and s.competence(0) == pytest.approx(0.3)
        assert s.competence(total // 4) < 1.0
    assert sampler(ramp=0.0).competence(0) == 1.0
    assert CurriculumConfig().ramp <= 1.0
    with pytest.raises(ValueError, match="ramp"):
        CurriculumConfig(ramp=1.5)


def test_deterministic_for_a_seed_and_different_for_another():
    a, b, c = sampler(), sampler(), sampler(seed=4)
    seq_a = [a.next_batch().tolist() for _ in range(15)]
    seq_b = [b.next_batch().tolist() for _ in range(15)]
    seq_c = [c.next_batch().tolist() for _ in range(15)]
    assert seq_a == seq_b
    assert seq_a != seq_c


def test_reweighting_favours_examples_the_student_finds_hard():
    s = sampler(ramp=0.0, uniform_mix=0.1, temperature=0.5)
    s.update(np.arange(20), np.where(np.arange(20) < 5, 5.0, 0.1))
    idx, p = s.probabilities()
    hard = p[np.isin(idx, np.arange(5))].sum()
    assert hard > 0.8
    counts = np.zeros(20)
    for _ in range(200):
        counts[s.next_batch()] += 1
    assert counts[:5].sum() > counts[5:].sum()
    # Every open example keeps a floor of probability.
    assert p.min() >= 0.1 / 20 - 1e-12
    flat = sampler(ramp=0.0, reweight=False)
    flat.update(np.arange(20), np.arange(20.0))
    assert np.allclose(flat.probabilities()[1], 1 / 20)


def test_running_loss_is_an_ema():
    s = sampler(ema=0.5)
    s.update(np.array([0]), np.array([4.0]))
    s.update(np.array([0]), np.array([2.0]))
    assert s.running_loss[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="finite"):
        s.update(np.array([1]), np.array([np.inf]))
    with pytest.raises(ValueError, match="outside"):
        s.update(np.array([99]), np.array([1.0]))


def test_state_round_trip_continues_the_same_sequence():
    a = sampler()
    for _ in range(4):
        idx = a.next_batch()
        a.update(idx, np.ones(len(idx)) * a.step)
    state = a.state_dict()
    expected = [a.next_batch().tolist() for _ in range(6)]
    b = sampler()
    b.load_state_dict(state)
    assert [b.next_batch().tolist() for _ in range(6)] == expected
    other = CurriculumSampler(np.linspace(0.0, 1.0, 20), a.cfg, 4, 20)
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(state)


def test_stats_report_open_fraction_and_weight_entropy():
    s = sampler(ramp=0.0)
    assert s.stats()["curriculum/open_fraction"] == 1.0
    assert s.stats()["curriculum/weight_entropy"] == pytest.approx(1.0)
    s.update(np.arange(20), np.arange(20.0))
    assert s.stats()["curriculum/weight_entropy"] < 1.0


@pytest.mark.parametrize(
    "kw, match",
    [({"c0": 0.0}, "c0"), ({"weights": (0.0, 0.0, 0.0)}, "weights"), ({"temperature": 0.0}, "temperature"),
     ({"ema": 1.0}, "ema"), ({"schedule": "cubic"}, "schedule"), ({"uniform_mix": 2.0}, "uniform_mix")],
)
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CurriculumConfig(**kw)


def test_sampler_rejects_impossible_batches():
    with pytest.raises(ValueError, match="exceeds the dataset"):
        sampler(n=3, batch=4)
    with pytest.raises(ValueError, match="total_steps"):
        sampler(total_steps=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 60), batch=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10), steps=st.integers(1, 30))
def test_every_draw_is_unique_within_the_open_set(n, batch, seed, steps):
    cfg = CurriculumConfig(c0=0.2, ramp=0.5, seed=seed)
    s = CurriculumSampler(np.random.default_rng(seed).random(n), cfg, batch, 20)
    for _ in range(steps):
        opened = set(s.open_indices().tolist())
        draw = s.next_batch()
        assert len(set(draw.tolist())) == batch
        assert set(draw.tolist()) <= opened


def test_without_reweighting_an_open_dataset_is_walked_in_epochs():
    """Uniform sampling visits every example once per pass (a short bootstrap sees all its demonstrations), in
    a different order each pass, and a restored sampler continues the same walk."""
    s = sampler(ramp=0.0, reweight=False)
    first = np.concatenate([s.next_batch() for _ in range(5)])
    second = np.concatenate([s.next_batch() for _ in range(5)])
    assert sorted(first.tolist()) == list(range(20)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    restored = sampler(ramp=0.0, reweight=False)
    restored.load_state_dict({**s.state_dict(), "step": 5})
    assert np.concatenate([restored.next_batch() for _ in range(5)]).tolist() == second.tolist()


# ------------------------------------------------------------------------------ the buffered (streaming) curriculum


def stream_through(buf, losses: dict[str, float], records: list[tuple[str, float]], steps: int):
    """Feed `records` (id, complexity) through the buffer the way a worker does; returns per-id draw counts and
    the order in which ids left the buffer."""
    from collections import Counter

    feed = iter(records)
    for slot in buf.free():
        rid, c = next(feed)
        buf.put(slot, rid, c)
    drawn: Counter = Counter()
    left: list[str] = []
    for _ in range(steps):
        slots = buf.next_batch()
        drawn.update(buf.ids[s] for s in slots)
        buf.update(slots, np.array([losses[buf.ids[s]] for s in slots]))
        gone = [buf.ids[s] for s in range(buf.capacity)]
        freed = buf.evict(len(slots))
        gone = [gone[s] for s in freed]
        left += gone
        for slot in freed:
            nxt = next(feed, None)
            if nxt is not None:
                buf.put(slot, *nxt)
    return drawn, left


def test_the_buffer_keeps_what_the_student_finds_hard_and_streams_the_rest_through():
    from sad_ray.method.curriculum import BufferedCurriculum

    records = [(f"r{i}", (i % 7) / 7) for i in range(400)]
    losses = {rid: (5.0 if i % 10 == 0 else 0.5) for i, (rid, _) in enumerate(records)}  # every 10th is hard
    buf = BufferedCurriculum(CurriculumConfig(c0=1.0, ramp=0.0, uniform_mix=0.1), capacity=16, batch_size=4,
                             total_steps=60)
    drawn, left = stream_through(buf, losses, records, steps=60)
    assert len(set(left)) == len(left)  # nothing leaves twice
    assert all(drawn[rid] >= 1 for rid in left)  # nothing leaves untrained
    assert len(drawn) > 16 * 3  # the stream moved on well past the first buffer
    # The hard examples stay and are drawn more often than the easy ones.
    hard = [drawn[r] for r in drawn if losses[r] > 1]
    easy = [drawn[r] for r in drawn if losses[r] < 1]
    assert np.mean(hard) > 2 * np.mean(easy), (np.mean(hard), np.mean(easy))


def test_the_buffer_opens_its_easiest_records_first_and_round_trips_its_state():
    from sad_ray.method.curriculum import BufferedCurriculum

    cfg = CurriculumConfig(c0=0.25, ramp=0.5, reweight=False)
    buf = BufferedCurriculum(cfg, capacity=8, batch_size=2, total_steps=20)
    for slot in buf.free():
        buf.put(slot, f"r{slot}", 1.0 - slot / 8)  # slot 7 is the easiest
    idx, p = buf.probabilities()
    assert sorted(idx.tolist()) == [6, 7] and np.allclose(p, 0.5)
    with pytest.raises(ValueError, match="slot 3 is taken"):
        buf.put(3, "x", 0.0)
    assert buf.evict(4) == []  # nothing trained yet: nothing leaves
    for _ in range(3):
        slots = buf.next_batch()
        buf.update(slots, np.ones(len(slots)))
    state = buf.state_dict()
    expected = [buf.next_batch().tolist() for _ in range(5)]
    again = BufferedCurriculum(cfg, capacity=8, batch_size=2, total_steps=20)
    again.load_state_dict(state)
    assert [again.next_batch().tolist() for _ in range(5)] == expected
    with pytest.raises(ValueError, match="has 8 slots, this one 4"):
        BufferedCurriculum(cfg, capacity=4, batch_size=2, total_steps=20).load_state_dict(state)
    with pytest.raises(ValueError, match="must hold at least one batch"):
        BufferedCurriculum(cfg, capacity=1, batch_size=2, total_steps=20)
