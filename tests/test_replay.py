"""The samples-per-insert limiter (plain bookkeeping) and the replay buffer actor that waits on it."""

import time

import numpy as np
import pytest

from learners.replay import Context, LimiterState, RatioLimiter


@pytest.mark.unit
def test_limiter_blocks_whichever_side_runs_ahead():
    lim = RatioLimiter(k=4, tolerance=2)
    assert lim.can_insert() and not lim.can_sample(1)  # nothing inserted yet: nothing to imagine on
    lim.state.inserts = 1  # owed 4
    assert not lim.can_insert()  # 4 > tolerance: the actors wait for the learner
    assert lim.can_sample(4) and lim.can_sample(6) and not lim.can_sample(7)  # may run 2 ahead, not 3
    lim.state.samples = 2  # owed 2
    assert lim.can_insert()


@pytest.mark.unit
@pytest.mark.parametrize("k,tolerance,batch", [(4, 2, 2), (4, 4, 4), (4, 8, 8), (1, 0, 1), (4, 0, 1)])
def test_limiter_never_deadlocks_and_keeps_the_ratio(k, tolerance, batch):
    """Random interleavings of both sides: one of them can always move, and |samples - k inserts|
    stays within tolerance + batch, so the cumulative ratio converges to k."""
    rng = np.random.default_rng(0)
    lim = RatioLimiter(k, tolerance)
    for _ in range(5000):
        ins, smp = lim.can_insert(), lim.can_sample(batch)
        assert ins or smp, (lim.state, batch)
        if ins and (not smp or rng.random() < 0.5):
            lim.state.inserts += 1
        else:
            lim.state.samples += batch
        assert abs(lim.owed) <= tolerance + max(k, batch)
    assert abs(lim.ratio - k) <= (tolerance + max(k, batch)) / lim.state.inserts


def context(i=0):
    return Context(np.zeros((8, 8, 3), np.uint8), np.zeros(4, np.float32), "goal", "game", i)


def wait_until(predicate, what: str, deadline_s: float = 60.0) -> None:
    """Polls `predicate`; the deadline only bounds a hang (nothing here bets on how long a step takes)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_replay_actor_waits_records_waits_and_restores_counters(ray_local):
    from learners.replay import ReplayBuffer

    ray = ray_local
    buf = ReplayBuffer.remote(capacity=3, k=4, tolerance=2, seed=0)
    assert ray.get(buf.sample.remote(1, 0.2)) is None  # empty: the sampler times out, nothing is taken
    ray.get(buf.insert.remote([context(0)]))  # owed 4
    blocked = buf.insert.remote([context(1)])  # 4 > tolerance: waits for imagined updates
    wait_until(lambda: ray.get(buf.stats.remote())["waiting_inserts"] == 1, "the insert to wait for its licence")
    assert not ray.wait([blocked], timeout=0)[0] and ray.get(buf.stats.remote())["inserts"] == 1
    assert len(ray.get(buf.sample.remote(2, 1.0))) == 2  # owed 2: the insert may go on
    assert ray.get(blocked, timeout=60) > 0  # it reports how long it waited
    assert ray.get(buf.stats.remote())["waiting_inserts"] == 0
    for i in range(2, 5):  # capacity 3: the oldest contexts are dropped
        ray.get(buf.sample.remote(4, 5.0))
        ray.get(buf.insert.remote([context(i)]))
    stats = ray.get(buf.stats.remote())
    assert stats["size"] == 3 and stats["inserts"] == 5 and stats["insert_wait_s"] > 0
    kept = ray.get(buf.state.remote())
    again = ReplayBuffer.remote(capacity=3, k=4, tolerance=2, state=kept)
    assert ray.get(again.state.remote()) == kept  # a resumed run keeps its counters
    assert LimiterState(**kept).inserts == 5
    # The resumed buffer is empty while updates are owed: the first insert goes through, so the
    # learner has a context to take them on (otherwise both sides would wait for ever).
    owing = ReplayBuffer.remote(capacity=3, k=4, tolerance=2, state={**kept, "samples": kept["samples"] - 8})
    assert ray.get(owing.owed.remote()) > 2
    ray.get(owing.insert.remote([context(9)]), timeout=10)
    assert len(ray.get(owing.sample.remote(4, 5.0))) == 4
    ray.kill(owing)
    ray.get(again.close.remote())
    assert ray.get(again.sample.remote(1, 5.0)) is None  # close releases a waiting sampler
    for actor in (buf, again):
        ray.kill(actor)


def test_an_imagined_update_the_limiter_has_not_licensed_yet_is_asked_again(ray_local):
    """Stage 4's learning loop on a replay that licenses nothing within the sampler's timeout (a loaded
    machine: the acting side has not inserted yet): `imagined_groups` returns None, so the loop asks again,
    instead of failing on the timed-out sample (it did with `grpo.min_critic_rank` set)."""
    from types import SimpleNamespace

    from learners.grpo import Stage4, Timer
    from learners.replay import ReplayBuffer

    ray = ray_local
    buf = ReplayBuffer.remote(capacity=3, k=4, tolerance=2, seed=0)
    stage = SimpleNamespace(cfg=SimpleNamespace(policy=None), agent=None, learning_time=Timer(), replay=buf,
                            learns=lambda game: False, gated_groups=0)
    assert Stage4.imagined_groups(stage, 2) is None and stage.gated_groups == 0
    ray.kill(buf)
