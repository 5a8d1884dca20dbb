"""Start-up against a cluster that may grow: fail at once when it never can, else ask the
autoscaler and wait a bounded, reported time.

The unit tests script the cluster (resources over a fake clock), so waiting costs no time and
the outcome never depends on timing; the slow test asks a real Ray for resources it lacks.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlnet_ray.capacity import POLL_S, REPORT_EVERY_S, Cluster, Need, ensure, held
from controlnet_ray.cli import parse_train_args as parse_args
from controlnet_ray.config import ConfigError
from controlnet_ray.launcher import plan_resources, resource_need

ROOT = Path(__file__).resolve().parents[1]
TWO_GPUS = Need(
    totals={"CPU": 3.0, "GPU": 2.0},
    bundles=({"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}),
    flags="--num_ray_workers 2",
    remedy="lower --num_ray_workers",
)


@dataclass
class Script:
    """A cluster whose totals change at given (fake) times, with an autoscaler ceiling."""

    timeline: list[tuple[float, dict[str, float]]]  # (from time t, totals)
    ceiling_: dict[str, float] | None = None
    now: float = 0.0
    requests: list[list[dict]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def resources(self) -> dict[str, float]:
        return [r for t, r in self.timeline if t <= self.now][-1]

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s

    def cluster(self) -> Cluster:
        return Cluster(
            resources=self.resources,
            ceiling=lambda: self.ceiling_,
            request=lambda b: self.requests.append(list(b)),
            clock=lambda: self.now,
            sleep=self.sleep,
            say=self.lines.append,
        )


def test_enough_now_asks_nothing():
    s = Script([(0, {"CPU": 8.0, "GPU": 2.0})])
    assert ensure(TWO_GPUS, 600, fixed=False, cluster=s.cluster()) is False
    assert s.requests == [] and s.lines == []


def test_a_fixed_cluster_fails_at_once_naming_the_flags():
    s = Script([(0, {"CPU": 8.0}), (1, {"CPU": 8.0, "GPU": 2.0})])
    with pytest.raises(ConfigError) as exc:
        ensure(TWO_GPUS, 600, fixed=True, cluster=s.cluster())
    assert str(exc.value) == (
        "--num_ray_workers 2 needs 3 CPU, 2 GPU but the Ray cluster has 8 CPU, 0 GPU: "
        "lower --num_ray_workers"
    )
    assert s.now == 0 and s.requests == []


def test_no_wait_on_a_connected_cluster_names_the_wait_flag():
    s = Script([(0, {"CPU": 8.0, "GPU": 1.0})])
    with pytest.raises(ConfigError, match="--resource_wait_s > 0") as exc:
        ensure(TWO_GPUS, 0, fixed=False, cluster=s.cluster())
    assert "\n" not in str(exc.value) and s.requests == []


def test_autoscaler_limits_below_the_need_fail_without_waiting():
    s = Script([(0, {"CPU": 8.0, "GPU": 1.0})], ceiling_={"CPU": 32.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="can grow the Ray cluster to 32 CPU, 1 GPU at most"):
        ensure(TWO_GPUS, 600, fixed=False, cluster=s.cluster())
    assert s.now == 0 and s.requests == []


def test_waits_for_the_autoscaler_reports_progress_and_withdraws_the_request():
    s = Script([(0, {"CPU": 8.0, "GPU": 1.0}), (95, {"CPU": 16.0, "GPU": 2.0})])
    s.ceiling_ = {"CPU": 32.0, "GPU": 4.0}
    with held(TWO_GPUS, 600, fixed=False, cluster=s.cluster()):
        assert s.requests == [list(TWO_GPUS.bundles)]
        assert 95 <= s.now <= 95 + POLL_S
    assert s.requests[-1] == []  # the autoscaler may scale down after the run
    assert "waiting up to 600 s (--resource_wait_s)" in s.lines[0]
    progress = [ln for ln in s.lines if "still waiting" in ln]
    assert len(progress) == int(95 // REPORT_EVERY_S) and "1 GPU of" in progress[0]
    assert s.lines[-1].startswith("resources: ready after")


def test_unknown_limits_wait_and_give_up_after_the_bound_naming_the_flag():
    s = Script([(0, {"CPU": 8.0, "GPU": 1.0})])
    with pytest.raises(ConfigError, match=r"after 120 s \(--resource_wait_s\)") as exc:
        ensure(TWO_GPUS, 120, fixed=False, cluster=s.cluster())
    assert "raise --resource_wait_s" in str(exc.value) and "\n" not in str(exc.value)
    assert s.now == pytest.approx(120) and s.requests == [list(TWO_GPUS.bundles), []]


def test_a_train_run_needs_its_workers_gpus_and_a_cpu_for_ray_data():
    cfg = parse_args(["--num_ray_workers", "2", "--use_gpu"])
    need = resource_need(cfg, plan_resources(cfg, available_cpus=8, local=False))
    assert need.totals == {"CPU": 3.0, "GPU": 2.0}
    assert sorted(map(str, need.bundles)) == sorted(map(str, TWO_GPUS.bundles))
    assert "--use_gpu" in need.flags and "drop --use_gpu" in need.remedy
    cpu = parse_args(["--num_ray_workers", "2", "--resource_wait_s", "0"])
    assert cpu.ray.resource_wait_s == 0
    assert "GPU" not in resource_need(cpu, plan_resources(cpu, 8, local=False)).totals


@pytest.mark.slow
def test_a_real_ray_is_asked_and_the_wait_gives_up_naming_the_flag():
    """A real Ray without GPUs, treated as a connected cluster: the autoscaler SDK call goes
    through (no autoscaler runs, so nothing arrives) and the bounded wait ends in the error."""
    code = (
        "import ray\n"
        "from controlnet_ray.capacity import held\n"
        "from controlnet_ray.config import ConfigError\n"
        "from tests.test_capacity import TWO_GPUS\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "try:\n"
        "    with held(TWO_GPUS, 2, fixed=False):\n"
        "        raise SystemExit('no GPUs, yet the wait returned')\n"
        "except ConfigError as exc:\n"
        "    print('ERROR:', exc)\n"
        "ray.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: --num_ray_workers 2 needs 3 CPU, 2 GPU but after 2 s" in proc.stdout
    assert "asked the autoscaler, waiting up to 2 s (--resource_wait_s)" in proc.stdout


def test_a_cluster_below_its_size_is_planned_at_a_whole_cpu_per_worker():
    """A 0-CPU head before the autoscaler adds workers: the run asks for a CPU per worker (and
    Ray Data's), not the quarter CPU and one thread its empty state would give; a cluster that
    holds quarter-CPU workers now is planned as before, and so is a local Ray."""
    cfg = parse_args(["--num_ray_workers", "2"])
    empty = plan_resources(cfg, available_cpus=0, local=False)
    assert (empty.cpus_per_worker, empty.torch_threads) == (1.0, 1)
    assert resource_need(cfg, empty).totals == {"CPU": 3.0}
    small = plan_resources(cfg, available_cpus=2, local=False)
    assert small.cpus_per_worker == 0.5
    assert plan_resources(cfg, available_cpus=1, local=True).cpus_per_worker == 0.25
