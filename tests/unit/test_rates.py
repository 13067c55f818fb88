"""api.rates.TokenBuckets: a burst, then one request per 1/rate seconds, per key."""

from __future__ import annotations

import pytest

from api.rates import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_grants_its_burst_then_says_how_long_to_wait() -> None:
    # arrange
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    # act
    granted = [buckets.take("a") for _ in range(3)]
    refused = buckets.take("a")
    # assert
    assert granted == [0.0, 0.0, 0.0]
    assert refused == pytest.approx(0.5)  # one token every half second


def test_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    # arrange: an empty bucket
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        buckets.take("a")
    # act / assert: a quarter second buys half a token, half a second one
    clock.now += 0.25
    assert buckets.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    # an idle hour refills the burst, no more
    clock.now += 3600
    assert [buckets.take("a") for _ in range(4)][3] > 0


def test_keys_have_buckets_of_their_own() -> None:
    # arrange
    clock = Clock()
    buckets = TokenBuckets(rate=0.01, burst=1, clock=clock)
    # act
    first, flood, other = buckets.take("a"), buckets.take("a"), buckets.take("b")
    # assert
    assert first == 0.0 and flood == pytest.approx(100.0) and other == 0.0


def test_a_refused_request_does_not_push_the_next_token_further_away() -> None:
    # arrange
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take("a")
    # act: a flood while empty
    waits = [buckets.take("a") for _ in range(10)]
    clock.now += 1.0
    # assert
    assert all(w == pytest.approx(1.0) for w in waits)
    assert buckets.take("a") == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_nonsense_settings_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBuckets(rate=rate, burst=burst)
