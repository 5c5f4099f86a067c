"""The generators' timings as one step's row reports them (the pipeline itself, on real
Ray, is in tests/integration/test_pipeline.py)."""
import pytest

from cluster.artifacts.metrics import slowest_generator


def test_generator_timings_take_the_slowest_and_count_the_sync_once():
    a = {"generate/engine": 2.0, "generate/convert": 0.01, "sync/start": 0.01, "sync/receive": 0.3,
         "sync/wait": 0.1, "sync/load": 0.2, "sync/finish": 0.02}
    b = {"generate/engine": 2.5, "generate/convert": 0.005, "sync/start": 0.01, "sync/receive": 0.2, "sync/finish": 0.01}
    out = slowest_generator([a, b])
    assert out["time/generate_engine"] == 2.5 and out["time/generate_convert"] == 0.01
    # wait and load are parts of receive: 0.01 + 0.3 + 0.02, not 0.63
    assert out["time/sync_generator"] == pytest.approx(0.33)


def test_engine_fullness_is_sequences_in_flight_per_engine_step_over_all_generators():
    a = {"generate/engine": 1.0, "generate/steps": 50.0, "generate/sequences": 50 * 200.0}
    b = {"generate/engine": 1.2, "generate/steps": 60.0, "generate/sequences": 60 * 90.0}
    out = slowest_generator([a, b])
    assert out["generate/engine_steps"] == 60.0
    assert out["generate/batch_mean"] == pytest.approx((50 * 200 + 60 * 90) / 110)
    assert slowest_generator([{}])["generate/batch_mean"] == 0.0
