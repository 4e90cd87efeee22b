#!/usr/bin/env bash
# The GPU checks as one prepared command, for a GPU machine that has torch, transformers, peft and timm
# but neither Ray nor diffusers (Ray's wheel is too large to carry; diffusers' is small).
#
#   bash bench/gpu_session.sh fetch         # here, with pip access: diffusers' wheel into .whl/ (git-ignored)
#   bash bench/gpu_session.sh run [PARTS]   # there: install .whl/ into /tmp/site, run PARTS, logs into $OUT
#
# PARTS (default "smoke generate"): smoke (bench/gpu_smoke.py, ~3 min), generate (bench_generate_gpu.py
# --quick, < 2 min), generate-full (< 5 min), finetune (bench_finetune_step.py --device cuda --preset sd15),
# classify (the classifier step benchmark, if present), score (bench_score.py --gpu: clip-b32 at batch 256, < 2 min).
# Each part's output goes to $OUT/<part>.log as well.
set -uo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_VERSION=$(grep -i '^diffusers==' constraints.txt | cut -d= -f3)

case "${1:-}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION}"
    ls -la .whl ;;
  run)
    shift
    out=${OUT:-/tmp/gpu-session}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing .whl/ failed: run 'bash bench/gpu_session.sh fetch' where pip works, and carry .whl"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
    status=0
    for part in ${*:-smoke generate}; do
      case "$part" in
        smoke) cmd=(python3 bench/gpu_smoke.py) ;;
        generate) cmd=(python3 bench/bench_generate_gpu.py --quick) ;;
        generate-full) cmd=(python3 bench/bench_generate_gpu.py) ;;
        finetune) cmd=(python3 bench/bench_finetune_step.py --device cuda --preset sd15) ;;
        classify) cmd=(python3 bench/bench_classify_step.py --device cuda) ;;
        score) cmd=(python3 bench/bench_score.py --gpu) ;;
        *) echo "unknown part '$part' (smoke, generate, generate-full, finetune, classify, score)"; exit 2 ;;
      esac
      echo "=== $part: ${cmd[*]}" | tee "$out/$part.log"
      "${cmd[@]}" 2>&1 | tee -a "$out/$part.log" || status=1
    done
    exit $status ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
