#!/usr/bin/env bash
# Audio: what the audio encoders and the offline audio datasets need, on top of scripts/setup.sh.
# Idempotent (a second run checks and changes nothing). Use PYTHON=... to pick the interpreter.
#   Debian: espeak-ng (synthetic voices), fluidsynth + fluid-soundfont-gm (General-MIDI notes),
#           asterisk-core-sounds-en-wav (real recordings of one human speaker: the speech test set)
#   pip:    unialign[audio] (soundfile, soxr); the weights packages efficientword-net and musicnn with
#           --no-deps (their own pins -- pyaudio, TensorFlow 1.x, numpy < 1.17 -- are not needed and do not install)
# then builds the two datasets (`unialign data gm-notes`, `unialign data spoken`: about 2 + 1.5 min) unless --no-data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

need=()
for pkg in espeak-ng fluidsynth fluid-soundfont-gm asterisk-core-sounds-en-wav; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup_audio: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('soundfile', 'soxr')))" 2>/dev/null; then
  echo "setup_audio: pip install -e .[audio]"
  $PY -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[audio]"
fi
if ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('eff_word_net', 'musicnn')))" 2>/dev/null; then
  echo "setup_audio: pip install --no-deps efficientword-net==1.0.5 musicnn==0.1.0"
  $PY -m pip install -q --disable-pip-version-check --no-deps efficientword-net==1.0.5 musicnn==0.1.0
fi
if [ "${1:-}" != "--no-data" ]; then  # scripts/setup.sh passes --no-data: the runs build the sets when first used
  $PY -m unialign data gm-notes
  $PY -m unialign data spoken
fi
echo "setup_audio: ok"
