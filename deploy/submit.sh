#!/usr/bin/env bash
# Submit an sm-dist training job to a running Ray cluster (e.g. the RayCluster of deploy/raycluster.yaml,
# port-forwarded: kubectl port-forward svc/sm-dist-head-svc 8265:8265).
#   deploy/submit.sh configs/gpt2-gpu.yaml [key=value ...]
# Env: RAY_DASHBOARD (default http://127.0.0.1:8265). Ray 2.60 uses token auth (RAY_AUTH_MODE=token).
set -euo pipefail
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...]}
shift
cd "$(dirname "$0")/.."
python -c "import sys; from sm_dist.config import load_config; load_config(sys.argv[1], sys.argv[2:])" \
  "$config" "$@" 2>/dev/null || python - "$config" "$@" <<'PY'
import sys, yaml
from sm_dist.config import Config, ConfigError, parse_overrides, _set_dotted
raw = yaml.safe_load(open(sys.argv[1]))
for k, v in parse_overrides(sys.argv[2:]):
    _set_dotted(raw, k, v)
Config.model_validate(raw)  # schema check here; paths are checked on the cluster
PY
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . \
  -- python -m sm_dist train "$config" "$@"
