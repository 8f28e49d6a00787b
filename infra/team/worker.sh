#!/usr/bin/env bash
# A Prefect process worker for one work pool, running stages in this machine's clone of the project.
#
#   cd <clone of the project> && infra/team/worker.sh <pool> [max concurrent flow runs]
#
# Needs PREFECT_API_URL and MLFLOW_TRACKING_URI (infra/team/env.example) and DVC credentials for the project's
# default remote. Stages that name `work_pool: <pool>` in pipelines.yaml run here after `rl4llm deploy <pipeline>`.
# Give GPU pools a limit of 1 (one training stage per machine); the pool that runs pipeline flows needs none, since
# a pipeline flow waits there while its stages run.
set -euo pipefail
pool="${1:?usage: worker.sh <pool> [limit]}"
export RL4LLM_PROJECT="$PWD"
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
exec prefect worker start --pool "$pool" --type process --name "$(hostname)-$pool" ${2:+--limit "$2"}
