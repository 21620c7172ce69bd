"""Restart policy, replayed against a fake clock: back-off doubles, intensity gives up,
quiet periods forgive.  One real launcher shows the whole path ends in a non-zero exit."""

from __future__ import annotations

import pytest

from agentbus_zmq.agents.restarts import GiveUp, Restart, RestartPolicy, RestartDecisions


@pytest.mark.unit
def test_an_agent_that_keeps_dying_backs_off_then_gives_up():
    sup = RestartDecisions(RestartPolicy(backoff_min=1.0, backoff_max=30.0, intensity=5, period=60.0))
    now, delays = 0.0, []
    while True:
        decision = sup.on_exit("a1", now)
        if isinstance(decision, GiveUp):
            break
        delays.append(round(decision.at - now, 9))
        now = decision.at + 0.01                      # it dies again right after its restart
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert "a1 died 6 times within 60 s" in decision.reason and sup.restarts["a1"] == 5


@pytest.mark.unit
def test_restarts_spread_beyond_the_period_are_forgiven():
    sup = RestartDecisions(RestartPolicy(backoff_min=1.0, backoff_max=30.0, intensity=2, period=10.0))
    decisions = [sup.on_exit("a1", t) for t in (0.0, 11.0, 22.0, 33.0, 44.0)]
    assert all(isinstance(d, Restart) for d in decisions)
    assert [d.at - t for d, t in zip(decisions, (0.0, 11.0, 22.0, 33.0, 44.0))] == [1.0] * 5


@pytest.mark.unit
def test_agents_are_counted_apart_and_the_delay_is_capped():
    sup = RestartDecisions(RestartPolicy(backoff_min=4.0, backoff_max=10.0, intensity=10, period=1000.0))
    delays = [sup.on_exit("a1", float(t)).at - t for t in range(4)]
    assert delays == [4.0, 8.0, 10.0, 10.0]
    assert sup.on_exit("a2", 5.0).at == 9.0 and sup.restarts == {"a1": 4, "a2": 1}


@pytest.mark.unit
def test_zero_intensity_never_restarts():
    assert isinstance(RestartDecisions(RestartPolicy(intensity=0)).on_exit("a1", 0.0), GiveUp)


@pytest.mark.unit
@pytest.mark.parametrize("kw", [{"backoff_min": 0}, {"backoff_min": 5, "backoff_max": 1}, {"intensity": -1},
                                {"period": 0}])
def test_nonsense_policies_are_refused(kw):
    with pytest.raises(ValueError):
        RestartPolicy(**kw)
