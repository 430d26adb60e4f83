#!/usr/bin/env bash
# Set up a fresh machine for attnfx: torch, then attnfx with its test extras.
#
# A bare `pip install torch` pulls a multi-GB CUDA build; when no torch is importable we
# pin the CPU wheel (2.13.0).  An existing torch (e.g. 2.11 on a GPU machine) is kept.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -c "import torch, triton, attnfx; print('attnfx', attnfx.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
