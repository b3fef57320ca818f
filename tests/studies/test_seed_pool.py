"""The studies' pool of worker processes: results in task order, a clear error for a bad size."""

import pytest

from reweighting.studies.parallel import CORES_ENV
from reweighting.studies.seed_pool import pool_map, pool_size


def test_pool_map_keeps_the_order_of_the_tasks_in_process():
    assert pool_map(pow, [(2, 3), (3, 2), (5, 0)], workers=1) == [8, 9, 1]
    assert pool_map(pow, [], workers=1) == []
    with pytest.raises(ValueError, match="workers must be >= 1"):
        pool_map(pow, [(2, 3), (3, 2)], workers=0)


def test_pool_size_keeps_to_the_cores_given(monkeypatch):
    monkeypatch.setenv(CORES_ENV, "2")
    assert pool_size(5) == 2 and pool_size(1) == 1 and pool_size(0) == 1
    monkeypatch.setenv(CORES_ENV, "8")
    assert pool_size(3) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_map_shows_each_task_as_it_finishes_and_keeps_the_order(workers):
    seen = []

    def progress(items, desc, total):
        assert total == len(tasks)
        for item in items:
            seen.append(desc)
            yield item

    tasks = [(2, 3), (3, 2), (5, 0), (2, 10)]
    assert pool_map(pow, tasks, workers=workers, progress=progress, desc="seeds") == [8, 9, 1, 1024]
    assert seen == ["seeds"] * len(tasks)
