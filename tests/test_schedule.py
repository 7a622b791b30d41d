"""The bootstrapping schedule: which epochs use a teacher, hand over, and with which alpha."""
from transfgu.train import bootstrap_schedule


def handovers(plans):
    return [e for e, p in enumerate(plans) if p.handover]


def test_published_schedule_for_coco():
    """start 3, intervals 3,3,3,2 per block of 10: hand-over at every multiple of 3 up to 29, then of 2."""
    plans = bootstrap_schedule(40, start=3, intervals=(3, 3, 3, 2), block=10)
    assert [p.bootstrapping for p in plans] == [False] * 3 + [True] * 37
    assert handovers(plans) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32, 34, 36, 38]


def test_alpha_grows_since_last_handover_and_saturates():
    plans = bootstrap_schedule(20, start=2, intervals=(12,), block=10)
    # first hand-over at the start epoch (2 is not a multiple of 12), then at 12
    assert handovers(plans) == [2, 12]
    alphas = [round(p.alpha, 2) for p in plans]
    assert alphas[:2] == [0.0, 0.0]
    assert alphas[2:12] == [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.1, 0.1]
    assert alphas[12:15] == [0.03, 0.04, 0.05]


def test_no_bootstrapping_when_start_is_beyond_training():
    plans = bootstrap_schedule(5, start=10)
    assert not any(p.bootstrapping or p.handover or p.alpha for p in plans)
