"""`mla k8s render`: RayJob + ConfigMap from a job config, bounds from the runnable world sizes.

Golden files live in tests/golden/k8s/; regenerate them after an intended change with
``MLA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_k8s_render.py`` and review the diff.
"""

import os
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_job_config, validate_job_dict
from orchestrator.contract.errors import ConfigError, PlanError
from orchestrator.k8s.render import RenderOptions, rayjob_name, render_job, to_yaml, worker_bounds
from orchestrator.k8s.validate import validation_errors

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "k8s"
GPU_SMALL = ROOT / "tests" / "k8s_configs" / "gpu_small.yaml"  # tp=2, gb=32, mb=4, 4..16 workers
TINY = ROOT / "configs" / "tiny.yaml"

CASES = {
    "gpu_small": (
        GPU_SMALL,
        RenderOptions(
            gpus_per_worker=2,
            queue="team-a",
            namespace="ml",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        ),
    ),
    "gpu_small_s3": (
        GPU_SMALL,
        RenderOptions(
            gpus_per_worker=4,
            storage_path="s3://bucket/mla",
            active_deadline_seconds=86400,
            backoff_limit=2,
        ),
    ),
    "tiny": (TINY, RenderOptions()),
}


def _job(path, *overrides):
    return load_job_config(
        path, list(overrides)
    )  # a missing config fails (ConfigError), never skips


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case):
    path, opts = CASES[case]
    text = to_yaml(render_job(_job(path), opts))
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("MLA_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}; run with MLA_UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text(), (
        f"{golden} differs; if intended, regenerate with MLA_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_objects_pass_strict_validation(case):
    path, opts = CASES[case]
    for obj in render_job(_job(path), opts):
        assert validation_errors(obj) == []


def test_bounds_are_the_runnable_world_sizes_in_whole_pods():
    # tp=2: W must be even; dp=W/2 must divide 32/4=8 -> dp in {1,2,4,8} -> W in {2,4,8,16}; in [4,16]: 4,8,16.
    job = _job(GPU_SMALL)
    two = worker_bounds(job, RenderOptions(gpus_per_worker=2))
    assert two.sizes == (4, 8, 16) and (two.min_replicas, two.max_replicas) == (2, 8)
    four = worker_bounds(job, RenderOptions(gpus_per_worker=4, min_gpus=2))
    assert four.sizes == (4, 8, 16) and (four.min_replicas, four.max_replicas) == (1, 4)
    eight = worker_bounds(job, RenderOptions(gpus_per_worker=8, min_gpus=2, max_gpus=12))
    assert eight.sizes == (8,) and (eight.min_replicas, eight.max_replicas) == (1, 1)


def test_bounds_skip_sizes_whose_data_parallel_degree_does_not_divide_the_batch():
    job = _job(GPU_SMALL, "parallel.tensor=1", "train.global_batch=24", "train.micro_batch=4")
    # dp=W must divide 24/4=6 -> W in {1,2,3,6}; within [2,8]: 2,3,6.
    assert worker_bounds(job, RenderOptions(min_gpus=2, max_gpus=8)).sizes == (2, 3, 6)


def test_pinned_data_parallel_degree_fixes_the_world_size():
    job = _job(GPU_SMALL, "parallel.data=4")
    assert worker_bounds(job, RenderOptions(gpus_per_worker=2)).sizes == (8,)


def test_no_runnable_size_is_a_plan_error_with_the_numbers():
    with pytest.raises(
        PlanError, match=r"no world size in \[4, 16\].*gpus_per_worker\(3\).*\[2, 4, 8, 16\]"
    ):
        worker_bounds(_job(GPU_SMALL), RenderOptions(gpus_per_worker=3))
    with pytest.raises(ConfigError, match=r"--min-gpus\(8\) > --max-gpus\(4\)"):
        worker_bounds(_job(GPU_SMALL), RenderOptions(min_gpus=8, max_gpus=4))


def test_entrypoint_and_configmap_round_trip_into_a_valid_elastic_job():
    config_map, rayjob = render_job(_job(GPU_SMALL), RenderOptions(gpus_per_worker=2))
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["mla", "train", "/etc/mla/job.yaml"]
    data = yaml.safe_load(config_map["data"]["job.yaml"])
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    from orchestrator.config import apply_override

    for item in overrides:
        apply_override(data, item)
    job = validate_job_dict(data)
    assert (job.cluster.min_workers, job.cluster.num_workers) == (4, 16)
    assert job.cluster.use_gpu and job.cluster.address == "auto"
    assert job.cluster.storage_path == "/mnt/checkpoints"
    assert job.parallel.tensor == 2 and job.run.name == "gpu_small"
    volumes = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "job-config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes


def test_worker_group_requests_and_limits_gpus_and_autoscales():
    _, rayjob = render_job(_job(GPU_SMALL), RenderOptions(gpus_per_worker=2))
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "2"
    assert group["replicas"] == group["minReplicas"] == 2 and group["maxReplicas"] == 8
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "kueue.x-k8s.io/queue-name" not in rayjob["metadata"]["labels"]


def test_uri_storage_path_mounts_no_volume():
    _, rayjob = render_job(_job(GPU_SMALL), RenderOptions(storage_path="s3://bucket/ckpt"))
    pod = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]
    assert "cluster.storage_path=s3://bucket/ckpt" in rayjob["spec"]["entrypoint"]


def test_rayjob_name_is_sanitised_and_checked():
    job = _job(GPU_SMALL, "run.name=My_Run.v2")
    assert rayjob_name(job, RenderOptions()) == "mla-my-run-v2"
    with pytest.raises(ConfigError, match="at most 47 characters"):
        rayjob_name(job, RenderOptions(name="x" * 48))
    with pytest.raises(ConfigError, match="DNS-1035"):
        rayjob_name(job, RenderOptions(name="9lives"))


def test_cli_render_to_stdout_and_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "k8s",
            "render",
            str(GPU_SMALL),
            "-g",
            "2",
            "--queue",
            "team-a",
            "--node-selector",
            "pool=gpu",
            "--namespace",
            "ml",
        ],
    )
    assert result.exit_code == 0, result.output
    objs = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    assert objs[1]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert objs[1]["metadata"]["namespace"] == "ml"
    out = tmp_path / "job.yaml"
    result = runner.invoke(app, ["k8s", "render", str(GPU_SMALL), "-g", "2", "-o", str(out)])
    assert (
        result.exit_code == 0 and list(yaml.safe_load_all(out.read_text()))[1]["kind"] == "RayJob"
    )
