#!/usr/bin/env bash
# Run the pipeline on a Ray cluster as one Ray job per stage, in order, each waiting for the one
# before it to succeed:
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh RUN_NAME
#
# Jobs are named diffmix-<stage>-<RUN> (RUN = RUN_NAME lower-cased, [a-z0-9-] only). Rerunning the
# same command after a failure resumes: a stage whose job SUCCEEDED is skipped, one still running
# is followed, one that FAILED/STOPPED is submitted again as diffmix-<stage>-<RUN>-retry<N> (Ray
# never reuses a submission id), and the stage itself picks up from what its output already holds
# (finetune: last checkpoint; generate: missing pairs only; train-cls: last epoch, via --resume).
#
# Environment:
#   RAY_ADDRESS     dashboard URL of the cluster (default http://127.0.0.1:8265, e.g. a port-forward)
#   RAY_AUTH_TOKEN  the cluster's token when token auth is on (never echoed)
#   STAGES          stages to run, in order (default "finetune generate train-cls")
#   CONFIG_DIR      per-stage configs <stage>.yaml (default jobs/configs, uploaded with the repo)
#   RUNTIME_ENV     runtime env file (default jobs/runtime_env.yaml)
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -eq 1 && $1 != -h && $1 != --help ]] || usage

RUN=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
[[ -n $RUN ]] || { echo "error: run name '$1' has no letters or digits" >&2; exit 2; }

cd "$(dirname "$0")/.."  # working_dir "." in the runtime env means the repo root
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
[[ $RAY_ADDRESS == http://* || $RAY_ADDRESS == https://* ]] || {
  echo "error: RAY_ADDRESS=$RAY_ADDRESS must be the dashboard URL (http://HEAD:8265), not the GCS address" >&2
  exit 2
}
# The ray CLI sends the token only in token mode; diffmix-ray sends RAY_AUTH_TOKEN whenever it is set.
[[ -z ${RAY_AUTH_TOKEN:-} ]] || export RAY_AUTH_MODE=token
STAGES=${STAGES:-finetune generate train-cls}
CONFIG_DIR=${CONFIG_DIR:-jobs/configs}
RUNTIME_ENV=${RUNTIME_ENV:-jobs/runtime_env.yaml}

for tool in ray diffmix-ray; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is not on PATH (pip install -e . in this repo)" >&2; exit 2; }
done
for stage in $STAGES; do
  [[ -f $CONFIG_DIR/$stage.yaml ]] || { echo "error: no config $CONFIG_DIR/$stage.yaml for stage '$stage'" >&2; exit 2; }
done
diffmix-ray status >/dev/null  # fails here, with the reason, if the cluster is unreachable

# The status of a submission id, or MISSING when the cluster has no such job.
state() {
  diffmix-ray status "$1" --json 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' 2>/dev/null || echo MISSING
}

run_stage() {
  local stage=$1 base="diffmix-$1-$RUN" id n=1 extra=()
  id=$base
  while :; do
    case $(state "$id") in
      SUCCEEDED) echo "== $id already SUCCEEDED: skipping $stage"; return 0 ;;
      PENDING|RUNNING) echo "== $id is in flight: following it"; break ;;
      MISSING)
        # A retry continues the stage's own output; train-cls refuses to without --resume.
        [[ $n -gt 1 && $stage == train-cls ]] && extra=(--resume)
        echo "== submitting $id"
        ray job submit --address "$RAY_ADDRESS" --submission-id "$id" --runtime-env "$RUNTIME_ENV" \
          --entrypoint-num-cpus 1 --no-wait \
          -- diffmix-ray "$stage" --config "$CONFIG_DIR/$stage.yaml" ${extra[@]+"${extra[@]}"}  # macOS bash 3.2-safe
        break ;;
      *) n=$((n + 1)); id="$base-retry$n" ;;  # FAILED or STOPPED: a submission id is used once
    esac
  done
  diffmix-ray logs "$id" --follow || true  # a dropped log stream is not a failed job: status decides
  if ! diffmix-ray status "$id" --wait; then
    echo "== $id did not succeed: \`diffmix-ray logs $id\`; fix the cause and rerun this command to resume" >&2
    return 1
  fi
}

for stage in $STAGES; do
  run_stage "$stage"
done
echo "== run $RUN: ${STAGES// / -> } succeeded"
