#!/usr/bin/env bash
# Submit an sm-dist training job to a running Ray cluster: a plain one (`ray start --head`, README "On a
# plain Ray cluster") or the RayCluster of deploy/raycluster.yaml, port-forwarded
# (kubectl port-forward svc/sm-dist-head-svc 8265:8265).
#   deploy/submit.sh configs/llama-8b-fsdp.yaml [key=value ...]
# Env: RAY_DASHBOARD (default http://127.0.0.1:8265).
# Auth (Ray 2.60 turns token auth on): the job API wants the cluster's token, found in this order:
#   RAY_AUTH_TOKEN; RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (what `ray start --head` writes: a plain Ray
#   cluster, submitting from its head or with the file copied); else, on KubeRay (raycluster.yaml sets
#   authOptions {mode: token, secretName: sm-dist-auth}), the secret read with kubectl (AUTH_SECRET).
# RAY_AUTH_MODE=disabled submits without one (a cluster started without token auth).
# run.run_dir must be absolute (on /shared), or relative with SM_DIST_RUN_ROOT set on the cluster (it is,
# to /shared/runs): the job's working directory is a per-job copy that Ray deletes.
set -euo pipefail
#   deploy/submit.sh --resume RUN_DIR [key=value ...]   (the run's saved config, on the shared filesystem)
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...] | --resume RUN_DIR [key=value ...]}
shift
cd "$(dirname "$0")/.."
if [[ "$config" == --resume ]]; then
  run_dir=${1:?usage: deploy/submit.sh --resume RUN_DIR [key=value ...]}
  shift
  set -- --resume "$run_dir" "$@"  # checked on the cluster, where the run's config.yaml is
  config=""
else
# schema and cross-field checks here; the paths are checked on the cluster
python - "$config" "$@" <<'PY'
import sys
from sm_dist.config import ConfigError, load_config
try:
    load_config(sys.argv[1], sys.argv[2:], paths=False)
except ConfigError as e:
    sys.exit(f"deploy/submit.sh: {e}")
PY
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && ! -s "$token_file" ]]; then
  if ! command -v kubectl >/dev/null; then
    echo "deploy/submit.sh: no Ray auth token: RAY_AUTH_TOKEN is unset, $token_file does not exist and" \
      "kubectl is not installed. Fix: on a plain Ray cluster copy the head's ~/.ray/auth_token here (or" \
      "set RAY_AUTH_TOKEN); on KubeRay install kubectl; a cluster without token auth: RAY_AUTH_MODE=disabled" >&2
    exit 2
  fi
  RAY_AUTH_TOKEN=$(kubectl get secret "${AUTH_SECRET:-sm-dist-auth}" -o jsonpath='{.data.auth_token}' | base64 -d)
  export RAY_AUTH_TOKEN
fi
exec ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . \
  -- python -m sm_dist train ${config:+"$config"} "$@"
