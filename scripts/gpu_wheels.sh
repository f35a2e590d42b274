#!/usr/bin/env bash
# Run here (with access to PyPI) before scripts/gpu_bench.sh on a GPU machine that has PyTorch, Lightning
# and torchmetrics but no Hydra and no network: puts the missing pure-Python wheels into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# the versions this checkout is tested with
hydra=$(python3 -c "import hydra; print(hydra.__version__)" 2>/dev/null || echo 1.3.2)
omegaconf=$(python3 -c "import omegaconf; print(omegaconf.__version__)" 2>/dev/null || echo 2.3.0)
python3 -m pip download --no-deps --only-binary=:all: -d .whl "hydra-core==$hydra" "omegaconf==$omegaconf"
python3 -m pip wheel --no-deps -w .whl "antlr4-python3-runtime==4.9.3"   # sdist only on PyPI: build the wheel here
ls -la .whl
