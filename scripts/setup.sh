#!/usr/bin/env bash
# Set up a fresh machine for attnfx: torch, then attnfx with its test extras.
#
# A bare `pip install torch` pulls a multi-GB CUDA build; when no torch is importable we
# pin the CPU wheel (2.13.0).  An existing torch (e.g. 2.11 on a GPU machine) is kept:
# every later install runs under a constraint that holds torch at the installed version,
# so that no dependency (torchvision, pulled in by timm) can replace it.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
if "$PY" -c "import triton" >/dev/null 2>&1; then
  "$PY" -c "import triton; print('triton==' + triton.__version__)" >>"$constraints"
else
  echo "triton==3.6.0" >>"$constraints"  # the version the interpreter tests and the GPU machines use
fi
"$PY" -m pip install --quiet -c "$constraints" -e ".[test]"
"$PY" -c "import torch, triton, attnfx; print('attnfx', attnfx.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
