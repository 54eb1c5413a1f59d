#!/usr/bin/env bash
# The one install of this project, run by `make` (and so by CI's `make test`) into .venv and by
# the Dockerfile into the image's Python, so that CI proves on a fresh machine that the image's
# dependency set installs.
#
#   scripts/install.sh PYTHON [--editable] [--extras LIST]
#
# 1. torch at the version pinned in pyproject.toml, first, from $TORCH_INDEX_URL when set (the
#    Dockerfile points it at the CPU or CUDA wheel index), else from pip's configured index;
# 2. DeepSpeed at its pyproject.toml pin without build isolation, so that it builds against that
#    torch; DS_BUILD_* variables in the environment (the Dockerfile's gpu target sets them)
#    prebuild its CUDA ops instead of JIT-compiling them on every node at run time;
# 3. the project with LIST extras (comma-separated), editable with --editable (development),
#    else as a regular install (the image).
#
# $PIP_INSTALL_FLAGS adds pip flags to every step (default: --quiet).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: scripts/install.sh PYTHON [--editable] [--extras LIST]" >&2
    exit 2
fi
PYTHON=$1
shift
EDITABLE=""
EXTRAS=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --editable) EDITABLE="-e"; shift ;;
        --extras) EXTRAS=$2; shift 2 ;;
        *) echo "scripts/install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r -a FLAGS <<< "${PIP_INSTALL_FLAGS:---quiet}"

pin() {  # the requirement string for distribution $1 from pyproject.toml (any list it is in)
    "$PYTHON" - "$ROOT/pyproject.toml" "$1" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
lists = [project.get("dependencies", [])] + list(project.get("optional-dependencies", {}).values())
name = sys.argv[2]
found = [r for deps in lists for r in deps if r.split(";")[0].strip().lower().startswith(name)]
if not found:
    sys.exit(f"scripts/install.sh: no {name} requirement in {sys.argv[1]}")
print(found[0].split(";")[0].strip())
PY
}

TORCH=$(pin torch)
DEEPSPEED=$(pin deepspeed)
INDEX=()
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    INDEX=(--index-url "$TORCH_INDEX_URL")
fi
set -x
"$PYTHON" -m pip install "${FLAGS[@]}" "${INDEX[@]}" "$TORCH"
"$PYTHON" -m pip install "${FLAGS[@]}" --no-build-isolation "$DEEPSPEED"
"$PYTHON" -m pip install "${FLAGS[@]}" $EDITABLE "$ROOT${EXTRAS:+[$EXTRAS]}"
