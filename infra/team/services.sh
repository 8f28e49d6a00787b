#!/usr/bin/env bash
# The team's shared services on one machine: a Prefect server (UI and API on :4200) and an MLflow tracking server
# (UI and API on :5000, sqlite backend, artifacts served by the server). Ctrl-C stops both.
#
#   infra/team/services.sh [state directory, default ~/rl4llm-services]
#
# Every machine that runs `rl4llm` or a worker then needs (see infra/team/env.example):
#   PREFECT_API_URL=http://<this host>:4200/api   MLFLOW_TRACKING_URI=http://<this host>:5000
set -euo pipefail
state="${1:-$HOME/rl4llm-services}"
mkdir -p "$state"
host="${RL4LLM_SERVICES_HOST:-0.0.0.0}"

trap 'kill 0' EXIT INT TERM
PREFECT_HOME="$state/prefect" prefect server start --host "$host" --port 4200 &
mlflow server --host "$host" --port 5000 --workers 2 \
  --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$state/mlartifacts" &
wait
