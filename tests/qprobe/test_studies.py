import json

import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies.qprobe import SMOKE, run_arithmetic


@pytest.fixture
def one_thread():
    # Tiny models run faster on one thread than on two that contend for a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_qprobe_study_smoke(tmp_path, one_thread):
    assert get_study("qprobe").seeds >= 5
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = run_arithmetic(SMOKE, ctx)
    assert set(outcome.methods) == {"pass@1", "L_Q", "L_CE", "L_PG", f"pass@{max(SMOKE.ks)} (oracle)"}
    values = {name: v[0] for name, v in outcome.methods.items()}
    # The oracle bounds every selection rule from above, and one sample's reward is in [0, 1].
    for name in ("pass@1", "L_Q", "L_CE", "L_PG"):
        assert 0.0 <= values[name] <= values[f"pass@{max(SMOKE.ks)} (oracle)"] + 1e-6
    checks = outcome.details["checks"]
    assert outcome.holds == all(checks.values())
    for plot in outcome.plots:
        assert (tmp_path / plot).stat().st_size > 0
    json.dumps(outcome.details, default=str)
