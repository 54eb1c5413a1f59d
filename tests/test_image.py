"""The container image and the one install script: the Dockerfile, the Makefile (and so CI) run
the same scripts/install.sh; the image's base matches the pinned Ray and Python; `mla k8s render`
puts `cluster.image` into every container. (No container engine here: CI proves the dependency
set installs because `make test` installs through the same script.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from orchestrator.config import DEFAULT_IMAGE, load_job_config
from orchestrator.k8s.render import RAY_VERSION, RenderOptions, render_job

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str) -> str:
    lists = [PROJECT["dependencies"], *PROJECT.get("optional-dependencies", {}).values()]
    return next(r for deps in lists for r in deps if re.match(rf"{name}\b", r))


def _arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M).group(1)


def _stages() -> dict[str, str]:
    """Stage name -> its text (from its FROM line to the next)."""
    parts = re.split(r"^(?=FROM )", DOCKERFILE, flags=re.M)
    return {re.search(r" AS (\S+)", p).group(1): p for p in parts if p.startswith("FROM ")}


def test_base_image_is_rayproject_ray_for_the_pinned_ray_and_python():
    ray_pin = re.search(r"==([\d.]+)", _requirement("ray")).group(1)
    python = re.search(r">=3\.(\d+)", PROJECT["requires-python"]).group(1)
    assert _arg("RAY_VERSION") == ray_pin == RAY_VERSION  # KubeRay's rayVersion describes the image
    assert _arg("PYTHON_TAG") == f"py3{python}"
    assert re.fullmatch(r"cu\d{3}", _arg("CUDA_TAG"))  # Ray's -cuXYZ platform tags
    bases = re.findall(r"^FROM (rayproject/ray:\S+) AS (\S+)$", DOCKERFILE, re.M)
    assert dict((stage, image) for image, stage in bases) == {
        "base-cpu": "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu",
        "base-gpu": "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}",
    }


def test_every_build_stage_installs_with_the_shared_script_and_the_image_runs_as_non_root():
    stages = _stages()
    for target in ("cpu", "gpu"):
        build = stages[f"build-{target}"]
        assert re.search(r"scripts/install\.sh python --extras train$", build, re.M), (
            build
        )  # non-editable
        assert "--editable" not in build
        final = stages[target]
        assert f"--from=build-{target}" in final and "scripts/install.sh" not in final
        assert re.findall(r"^USER (\S+)", final, re.M) == ["ray"]
    assert "DS_BUILD_FUSED_ADAM=1" in stages["build-gpu"] and "DS_BUILD" not in stages["build-cpu"]


def test_make_installs_with_the_same_script_which_reads_every_pin_from_pyproject():
    rule = re.search(
        r"^\$\(BIN\)/\.installed:.*?(?=^\S)", (ROOT / "Makefile").read_text(), re.M | re.S
    ).group(0)
    assert "scripts/install.sh $(BIN)/python --editable" in rule
    assert "pip install" not in rule  # nothing installed beside the script
    script = (ROOT / "scripts" / "install.sh").read_text()
    torch, deepspeed = _requirement("torch"), _requirement("deepspeed")
    for version in re.findall(r"\d+\.\d+", torch + deepspeed):
        assert version not in script  # the pins live in pyproject.toml only


@pytest.mark.parametrize("image", [None, "registry.example/ml/mla-train:0.1.0-gpu"])
def test_render_puts_cluster_image_into_every_container(image):
    job = load_job_config(
        ROOT / "configs" / "tiny.yaml", [f"cluster.image={image}"] if image else []
    )
    rayjob = render_job(job, RenderOptions())[1]
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    images = [
        c["image"]
        for pod in pods
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
    ]
    assert len(images) >= 2 and set(images) == {image or DEFAULT_IMAGE}


def test_render_image_option_overrides_cluster_image():
    job = load_job_config(ROOT / "configs" / "tiny.yaml", ["cluster.image=a/b:1"])
    rayjob = render_job(job, RenderOptions(image="c/d:2"))[1]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "c/d:2"


def test_shipped_manifests_name_the_documented_image():
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        for image in re.findall(r"^\s*(?:#\+ )?image: (\S+)", path.read_text(), re.M):
            assert image == DEFAULT_IMAGE, path
    assert f"-t REGISTRY/{DEFAULT_IMAGE.split(':')[0]}" in (ROOT / "k8s" / "README.md").read_text()
