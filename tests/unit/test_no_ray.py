"""The unit tier starts no Ray: tests/conftest.py turns every ray.init under tests/unit
into an error, whether called or reached through Ray's auto-init."""
import pytest


def test_starting_ray_in_the_unit_tier_fails_loudly():
    import ray

    try:
        with pytest.raises(RuntimeError, match="the unit tier starts no Ray"):
            ray.init(num_cpus=1, include_dashboard=False)
        with pytest.raises(RuntimeError, match="the unit tier starts no Ray"):
            ray.put(1)  # auto-init: what an unwitting ray.get or actor .remote() would do
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():  # the guard failed: leave no Ray to the tests after this one
            ray.shutdown()
