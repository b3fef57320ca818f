"""``reweighting.testing.launch``: a slow start is not a hang, a silent death is reported at once."""

import pytest

from reweighting.testing import launch

from . import launch_workers as W

pytestmark = [pytest.mark.distributed]


def test_a_slow_start_does_not_count_against_the_run_timeout():
    # Each worker takes 8 s to start (as importing torch can on a loaded machine); the run of fn
    # itself is short. Only the run is bounded by timeout.
    got = launch(W.rank_and_value, 2, W.SlowToLoad(8.0, "x"), timeout=4.0)
    assert got == [(0, 2, "x"), (1, 2, "x")]


def test_a_slow_start_is_bounded_by_start_timeout():
    with pytest.raises(TimeoutError, match="did not start within start_timeout=2.0 s"):
        launch(W.rank_and_value, 2, W.SlowToLoad(600.0, "x"), start_timeout=2.0)


def test_a_hang_in_fn_raises_after_timeout():
    with pytest.raises(TimeoutError, match="did not finish within timeout=2.0 s"):
        launch(W.hang, 2, timeout=2.0)


def test_a_worker_that_dies_without_a_word_is_reported_with_its_exit_code():
    # Not after the timeout: the parent sees the process gone (the timeout here would be 10 minutes).
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 without a result"):
        launch(W.exit_silently_on_rank_1, 2, timeout=600.0)
