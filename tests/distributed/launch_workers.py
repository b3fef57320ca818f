"""Functions run on each rank by the tests of ``reweighting.testing.launch`` (light imports on purpose)."""

import os
import time


def rank_and_value(rank, world, value):
    return rank, world, value


def exit_silently_on_rank_1(rank, world):
    if rank == 1:
        os._exit(3)  # no traceback, no message: as if killed
    return rank


def hang(rank, world):
    time.sleep(600)


def _arrive_late(seconds, value):
    time.sleep(seconds)
    return value


class SlowToLoad:
    """An argument whose unpickling in the new process takes ``seconds``: a slow start-up, on demand."""

    def __init__(self, seconds, value):
        self.seconds, self.value = seconds, value

    def __reduce__(self):
        return _arrive_late, (self.seconds, self.value)
