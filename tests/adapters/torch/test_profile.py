"""Layer costs and link samples for the simulator, measured on real models and groups."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

from legato.adapters.torch.profile import comm_tasks, layer_costs  # noqa: E402
from legato.launch import run_torch_job  # noqa: E402

WORKERS = str(Path(__file__).parent / "_workers.py")


class Slow(torch.nn.Module):
    """A parameter-free module that sleeps: its time must go to the next layer's forward."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_layer_costs_add_up_and_follow_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), Slow(), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
    x = torch.randn(32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    costs = layer_costs(model, lambda: model(x).square().mean(), opt, steps=5, warmup=1)
    assert [c.name for c in costs] == ["0", "3", "4"]
    assert costs[1].forward_s >= 0.02  # the sleep before layer "3" is layer 3's forward
    assert costs[0].forward_s < 0.02
    assert all(c.backward_s > 0 for c in costs)
    # the update is split by bytes: layer "3" (65,792 floats) > layer "4" (2,570)
    assert costs[1].update_s > costs[2].update_s > 0
    tasks, names = comm_tasks(model)
    assert names == ["0", "3", "4"] and [t.layer for t in tasks] == [0, 0, 1, 1, 2, 2]
    assert tasks[2].nbytes == 256 * 256 * 4


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_link_samples_on_a_real_group_fit_a_link():
    result = run_torch_job(f"{WORKERS}:link_fit", 2, timeout_s=150)
    assert "link fit:" in result.rank(0).stdout
