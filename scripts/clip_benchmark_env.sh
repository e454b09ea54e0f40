#!/usr/bin/env bash
# A side virtualenv in which the real CLIP_benchmark (1.6.2) imports beside unialign; prints its path.
#
# CLIP_benchmark needs torchvision, and no torchvision build loads beside unialign's CPU torch 2.13
# (pip's torchvision 0.28 is built for the CUDA torch: `operator torchvision::nms does not exist`, and
# transformers then fails to import). Its accuracy() also calls float() on a 1-element array, which
# NumPy >= 2.4 refuses. So this environment gets its own torch 2.14.1 + torchvision 0.29.1 (a CUDA
# build that runs on CPU; about 3 GB with its CUDA libraries) and NumPy < 2.4, and sees everything
# else, unialign included, through the interpreter it was made from (a .pth line adding that
# interpreter's site-packages after its own). The main environment is never touched.
#
#   bash scripts/clip_benchmark_env.sh [folder]     # default $UNIALIGN_HOME/venvs/clip-benchmark
#   <folder>/bin/python -m unialign benchmark runs/default
#
# Idempotent: a second run only checks that clip_benchmark and unialign import. PYTHON=... picks the
# interpreter whose packages (and unialign) the side environment extends.
set -euo pipefail
PY=${PYTHON:-python3}
HOME_DIR=${UNIALIGN_HOME:-$HOME/.cache/unialign}
VENV=${1:-$HOME_DIR/venvs/clip-benchmark}
check() { "$VENV/bin/python" -c "import clip_benchmark.cli, torchvision, unialign.openclip" >/dev/null 2>&1; }

if [ -x "$VENV/bin/python" ] && check; then
  echo "$VENV"
  exit 0
fi
echo "clip_benchmark_env: building $VENV (torch 2.14.1 + torchvision 0.29.1, a few minutes the first time)" >&2
"$PY" -m venv --clear "$VENV"
site_dir=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
parent=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# `import site; site.addsitedir(...)` in a .pth runs at start-up and also reads the parent's .pth files
# (editable installs); appended after the venv's own site-packages, whose torch therefore wins.
echo "import site; site.addsitedir('$parent')" > "$site_dir/zz_parent_environment.pth"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" "numpy<2.4" \
  ftfy pycocoevalcap "webdataset>=0.2.31"
# --no-deps: their declared dependencies are the ones above (or already in the parent environment).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "clip-benchmark==1.6.2" "open-clip-torch==3.3.0"
check || { echo "clip_benchmark_env: $VENV built, but clip_benchmark or unialign does not import there" >&2; exit 1; }
echo "$VENV"
