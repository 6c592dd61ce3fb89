"""Unit tests of core.health: rise/fall, passive ejection with backoff, slow start, drain."""

from __future__ import annotations

from edgeproxy.core.health import HealthBook, HealthPolicy, ServerHealth, State

POLICY = HealthPolicy(rise=2, fall=3, max_fails=2, eject_base=5.0, eject_max=20.0, slow_start=10.0)


def test_starts_up_without_slow_start() -> None:
    h = ServerHealth(POLICY)
    assert h.state(0.0) is State.UP and h.weight_factor(0.0) == 1.0


def test_fall_then_rise_then_slow_start() -> None:
    h = ServerHealth(POLICY)
    assert not h.active_result(False, 1.0)
    assert not h.active_result(False, 2.0)
    assert h.state(2.0) is State.UP
    assert h.active_result(False, 3.0)  # third failure in a row: down
    assert h.state(3.0) is State.DOWN
    assert not h.active_result(True, 4.0)
    assert h.state(4.0) is State.DOWN
    assert h.active_result(True, 5.0)  # rise = 2
    assert h.state(5.0) is State.SLOW_START
    assert h.weight_factor(5.0) == 0.1  # the floor
    assert h.weight_factor(10.0) == 0.5
    assert h.state(15.0) is State.UP and h.weight_factor(15.0) == 1.0


def test_a_success_breaks_the_failure_streak() -> None:
    h = ServerHealth(POLICY)
    for ok in (False, False, True, False, False):
        h.active_result(ok, 1.0)
    assert h.state(1.0) is State.UP


def test_passive_ejection_backs_off_exponentially_and_is_capped() -> None:
    h = ServerHealth(POLICY)
    assert not h.passive_failure(0.0)
    assert h.passive_failure(0.0)  # max_fails = 2
    assert h.state(0.0) is State.DOWN and h.ejected_until == 5.0
    assert not h.passive_failure(1.0)  # already out: not counted
    assert h.state(5.0) is State.SLOW_START  # back, ramping
    h.passive_failure(5.0)
    assert h.passive_failure(5.0)
    assert h.ejected_until == 15.0  # 5 * 2
    h.passive_failure(15.0)
    h.passive_failure(15.0)
    assert h.ejected_until == 35.0  # 5 * 4 = 20 = the cap
    h.passive_failure(35.0)
    h.passive_failure(35.0)
    assert h.ejected_until == 55.0  # still capped at 20
    assert h.retry_after(40.0, 1.0) == 15.0


def test_success_resets_the_streak_and_later_the_backoff() -> None:
    h = ServerHealth(POLICY)
    h.passive_failure(0.0)
    h.passive_success(0.5)
    assert not h.passive_failure(1.0)  # streak restarted
    assert h.passive_failure(1.0)
    assert h.ejections == 1
    h.passive_success(10.0)  # back at 6, only 4 s healthy: backoff remembered
    assert h.ejections == 1
    h.passive_success(26.0)  # eject_max (20) seconds after the ejection ended
    assert h.ejections == 0


def test_drain_wins_over_everything() -> None:
    h = ServerHealth(POLICY, drain=True)
    assert h.state(0.0) is State.DRAINING
    h.drain = False
    assert h.state(0.0) is State.UP


def test_book_eligible_weights_and_retry_after() -> None:
    book = HealthBook(POLICY, ["a", "b", "c"], drained=["c"])
    assert book.eligible(0.0, {"a": 2, "b": 1}) == {"a": 2.0, "b": 1.0}
    book["b"].passive_failure(0.0)
    book["b"].passive_failure(0.0)
    assert book.eligible(1.0, {"a": 2}) == {"a": 2.0}
    assert book.eligible(6.0, {"a": 2}) == {"a": 2.0, "b": 0.1}  # b slow-starting
    for _ in range(3):
        book["a"].active_result(False, 7.0)
    book["b"].passive_failure(7.0)
    book["b"].passive_failure(7.0)  # out until 17
    assert book.eligible(7.0, {}) == {}
    assert book.retry_after(7.0, 2.0) == 4  # a: rise 2 checks x 2 s beats b's 10 s


def test_book_update_keeps_the_state_of_servers_that_stay() -> None:
    book = HealthBook(POLICY, ["a", "b", "c"], drained=["c"])
    book["b"].passive_failure(0.0)
    book["b"].passive_failure(0.0)  # b ejected until 5
    kept_b = book["b"]
    stricter = HealthPolicy(rise=1, fall=1, max_fails=1, eject_base=1.0, eject_max=4.0, slow_start=0.0)
    removed = book.update(stricter, ["d", "b", "c"], drained=[])
    assert removed == ["a"]
    assert list(book.servers) == ["d", "b", "c"]
    assert book["b"] is kept_b and book["b"].policy is stricter
    assert book["b"].state(1.0) is State.DOWN  # its ejection survives the reload
    assert book["d"].state(1.0) is State.UP  # a new server starts up
    assert book["c"].state(1.0) is State.UP  # the new config lifts c's drain
    book.update(stricter, ["d", "b", "c"], drained=["d"])
    assert book["d"].state(1.0) is State.DRAINING
