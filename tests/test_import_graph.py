"""The three rooms, enforced by the imports (pure Python: ``ast`` and ``importlib``).

* ``workers`` and ``mla`` reach the control plane only through ``orchestrator.contract``;
* the contract imports nothing of the project but itself, the job schema and the model shape;
* no ``orchestrator`` module loads torch, Ray or DeepSpeed when imported (every module);
* ``mla`` never imports Ray or DeepSpeed, not even inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "deepspeed")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["workers", "mla"])
def test_data_plane_and_model_reach_the_control_plane_only_through_the_contract(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if _top(name) == "orchestrator" and not name.startswith("orchestrator.contract")
    ]
    assert not bad, "\n".join(bad)


def test_the_contract_imports_only_itself_the_job_schema_and_the_model_shape():
    allowed = ("orchestrator.contract", "orchestrator.config", "mla.config")
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules("orchestrator/contract")
        for line, name in _imports(path)
        if _top(name) in ("orchestrator", "workers", "mla", *HEAVY) and not name.startswith(allowed)
    ]
    assert not bad, "\n".join(bad)


def test_mla_never_imports_ray_or_deepspeed():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules("mla")
        for line, name in _imports(path)
        if _top(name) in ("ray", "deepspeed")
    ]
    assert not bad, "\n".join(bad)


_PROBE = """
import importlib, json, pkgutil, sys
import orchestrator
heavy = ("torch", "ray", "deepspeed")
culprits = {}
for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
    importlib.import_module(info.name)
    loaded = [h for h in heavy if h in sys.modules and h not in culprits.values()]
    for h in loaded:
        culprits.setdefault(info.name, h)
print(json.dumps({"modules": len(list(pkgutil.walk_packages(orchestrator.__path__, "orchestrator."))),
                  "culprits": culprits}))
"""


def test_no_orchestrator_module_imports_torch_ray_or_deepspeed_at_import_time():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["modules"] >= 30  # every module was imported, not only the CLI
    assert report["culprits"] == {}, report["culprits"]
