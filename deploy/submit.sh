#!/usr/bin/env bash
# Submit an sm-dist training job to a running Ray cluster (the RayCluster of deploy/raycluster.yaml,
# port-forwarded: kubectl port-forward svc/sm-dist-head-svc 8265:8265).
#   deploy/submit.sh configs/llama-8b-fsdp.yaml [key=value ...]
# Env: RAY_DASHBOARD (default http://127.0.0.1:8265).
# Auth: raycluster.yaml sets authOptions {mode: token, secretName: sm-dist-auth}, so the job API wants that
# token: RAY_AUTH_TOKEN if set, else read from the secret with kubectl (AUTH_SECRET, default sm-dist-auth).
# RAY_AUTH_MODE=disabled submits without one (a cluster started without authOptions).
# run.run_dir must be absolute (on /shared), or relative with SM_DIST_RUN_ROOT set on the cluster (it is,
# to /shared/runs): the job's working directory is a per-job copy that Ray deletes.
set -euo pipefail
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...]}
shift
cd "$(dirname "$0")/.."
# schema and cross-field checks here; the paths are checked on the cluster
python - "$config" "$@" <<'PY'
import sys, yaml
from sm_dist.config import Config
from sm_dist.config_load import _set_dotted, parse_overrides
raw = yaml.safe_load(open(sys.argv[1]))
for k, v in parse_overrides(sys.argv[2:]):
    _set_dotted(raw, k, v)
Config.model_validate(raw)
PY
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  RAY_AUTH_TOKEN=$(kubectl get secret "${AUTH_SECRET:-sm-dist-auth}" -o jsonpath='{.data.auth_token}' | base64 -d)
  export RAY_AUTH_TOKEN
fi
exec ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . \
  -- python -m sm_dist train "$config" "$@"
