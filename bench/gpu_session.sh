#!/usr/bin/env bash
# The GPU checks and figures as prepared commands, for the lent GPU machine: Python 3.12 with the packages
# of bench/gpu_image.txt (torch, transformers, peft, timm, ...), but neither Ray nor diffusers, and no
# network. bench/README.md ("On a lent GPU machine") gives the two commands to paste.
#
#   bash bench/gpu_session.sh fetch           # here, with pip: into .whl/ the carried wheels (diffusers) and
#                                             # all of their Requires-Dist closure that the image lacks
#   bash bench/gpu_session.sh run [PARTS]     # there: install .whl/ into /tmp/site exactly, check every import
#                                             # (exit 2 at once if one fails), run PARTS; $OUT/<part>.json each
#   bash bench/gpu_session.sh emulate [PARTS] # here: the same `run`, --device cpu at small settings, in a venv
#                                             # with the image's packages and nothing else (built once, cached)
#
# PARTS: smoke generate generate-compile score (the default: command 1), finetune finetune-compile classify
# (command 2), generate-full. Each part runs under its own time budget; `emulate` with no PARTS runs all but
# generate-full. Environment: OUT (figures; default /tmp/gpu-session/out), GPU_SESSION_WORK (the shared model
# folder, kept between commands), GPU_EMULATE_DIR (the emulation's cache), GPU_EMULATE_PYTHON (its Python 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

install_wheels() {  # $1: python, $2: target folder
  ls .whl/*.whl >/dev/null 2>&1 \
    || { echo "no wheels in .whl/: run 'bash bench/gpu_session.sh fetch' where pip works, and carry .whl"; exit 2; }
  rm -rf "$2"
  "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" .whl/*.whl \
    || { echo "installing .whl/ failed: run 'bash bench/gpu_session.sh fetch' again (one version of each)"; exit 2; }
}

find_python312() {
  for p in "${GPU_EMULATE_PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c 'import venv' 2>/dev/null && { command -v "$p"; return; }
  done
  echo "python3"  # the nearest: bench/gpu_image.txt's markers pick the versions that have wheels for it
}

case "${1:-}" in
  fetch)
    python3 bench/gpu_session.py fetch --dest .whl ;;
  run)
    shift
    py=${PYTHON:-python3}
    site=${GPU_SESSION_SITE:-/tmp/site}
    install_wheels "$py" "$site"
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    exec "$py" bench/gpu_session.py run "$@" ;;
  emulate)
    shift
    emu=${GPU_EMULATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/diffmix-ray/gpu-emulate}
    py=$(find_python312)
    stamp="$("$py" --version 2>&1) $(sha256sum bench/gpu_image.txt | cut -c1-16)"
    if [ "$(cat "$emu/venv/.image-stamp" 2>/dev/null)" != "$stamp" ]; then
      echo "emulate: building the GPU image's environment in $emu/venv with $("$py" --version 2>&1) (once; network)"
      started=$(date +%s)
      mkdir -p "$emu"
      "$py" -m venv --clear "$emu/venv" && "$emu/venv/bin/python" bench/gpu_session.py install-image \
        || { echo "emulate: building $emu/venv failed"; exit 2; }
      echo "$stamp" > "$emu/venv/.image-stamp"
      echo "emulate: environment built in $(( $(date +%s) - started )) s"
    else
      echo "emulate: using $emu/venv ($stamp)"
    fi
    pin=$(grep -i '^diffusers==' constraints.txt | cut -d= -f3)
    ls .whl/diffusers-"$pin"-*.whl >/dev/null 2>&1 || python3 bench/gpu_session.py fetch --dest .whl || exit 2
    [ $# -gt 0 ] || set -- smoke generate generate-compile score finetune finetune-compile classify
    PYTHON="$emu/venv/bin/python" GPU_SESSION_SITE="$emu/site" PYTHONNOUSERSITE=1 OUT="${OUT:-$emu/out}" \
      GPU_SESSION_WORK="${GPU_SESSION_WORK:-$emu/work}" exec bash bench/gpu_session.sh run --small "$@" ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
