#!/usr/bin/env bash
# Run a recipe (`diffmix-ray run`: every stage, method and seed of a table column) as one Ray job:
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh RUN_NAME RECIPE --data URI --model URI --out URI [run options]
#
# The job is named diffmix-run-<RUN> (RUN = RUN_NAME lower-cased, [a-z0-9-] only); everything after
# RECIPE goes to `diffmix-ray run` unchanged (`diffmix-ray run --help`). Rerunning the same command
# after a failure resumes: a SUCCEEDED job is skipped, one still running is followed, a FAILED/STOPPED
# one is submitted again as diffmix-run-<RUN>-retry<N> (Ray never reuses a submission id), and `run`
# itself skips every step whose output is complete and resumes the one that was cut.
#
# Environment:
#   RAY_ADDRESS     dashboard URL of the cluster (default http://127.0.0.1:8265, e.g. a port-forward)
#   RAY_AUTH_TOKEN  the cluster's token when token auth is on (never echoed)
#   RUNTIME_ENV     runtime env file (default jobs/runtime_env.yaml)
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 && $1 != -h && $1 != --help ]] || usage

RUN=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
[[ -n $RUN ]] || { echo "error: run name '$1' has no letters or digits" >&2; exit 2; }
shift  # "$@" is now RECIPE and the run options

cd "$(dirname "$0")/.."  # working_dir "." in the runtime env means the repo root
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
[[ $RAY_ADDRESS == http://* || $RAY_ADDRESS == https://* ]] || {
  echo "error: RAY_ADDRESS=$RAY_ADDRESS must be the dashboard URL (http://HEAD:8265), not the GCS address" >&2
  exit 2
}
# The ray CLI sends the token only in token mode; diffmix-ray sends RAY_AUTH_TOKEN whenever it is set.
[[ -z ${RAY_AUTH_TOKEN:-} ]] || export RAY_AUTH_MODE=token
RUNTIME_ENV=${RUNTIME_ENV:-jobs/runtime_env.yaml}

for tool in ray diffmix-ray; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is not on PATH (pip install -e . in this repo)" >&2; exit 2; }
done
# An unknown or invalid recipe fails here, with the reason (an unknown name lists the known ones).
if ! err=$(diffmix-ray recipe show "$1" 2>&1 >/dev/null); then echo "$err" >&2; exit 2; fi
diffmix-ray status >/dev/null  # fails here, with the reason, if the cluster is unreachable

# The status of a submission id, or MISSING when the cluster has no such job.
state() {
  diffmix-ray status "$1" --json 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' 2>/dev/null || echo MISSING
}

base="diffmix-run-$RUN" id="diffmix-run-$RUN" n=1
while :; do
  case $(state "$id") in
    SUCCEEDED) echo "== $id already SUCCEEDED: skipping"; exit 0 ;;
    PENDING|RUNNING) echo "== $id is in flight: following it"; break ;;
    MISSING)
      echo "== submitting $id"
      # The driver runs prepare and the report itself (CPU); the stages' workers ask for their own resources.
      ray job submit --address "$RAY_ADDRESS" --submission-id "$id" --runtime-env "$RUNTIME_ENV" \
        --entrypoint-num-cpus 1 --no-wait -- diffmix-ray run "$@"  # ray quotes each argument itself
      break ;;
    *) n=$((n + 1)); id="$base-retry$n" ;;  # FAILED or STOPPED: a submission id is used once
  esac
done
diffmix-ray logs "$id" --follow || true  # a dropped log stream is not a failed job: status decides
if ! diffmix-ray status "$id" --wait; then
  echo "== $id did not succeed: \`diffmix-ray logs $id\`; fix the cause and rerun this command to resume" >&2
  exit 1
fi
echo "== $id succeeded"
