#!/usr/bin/env bash
# A Prefect process worker for one work pool, running stages in this machine's clone of the project.
#
#   cd <clone of the project> && infra/team/worker.sh <pool> [max concurrent flow runs]
#
# Needs PREFECT_API_URL and MLFLOW_TRACKING_URI (infra/team/env.example) and DVC credentials for the project's
# default remote. Stages that name `work_pool: <pool>` in pipelines.yaml run here after `rl4llm deploy <pipeline>`.
# Give GPU pools a limit of 1 (one training stage per machine); the pool that runs pipeline flows needs none, since
# a pipeline flow waits there while its stages run.
#
# A stage whose accelerate config spans M machines runs machine 0's share on a worker of its pool and machine r's
# (r = 1..M-1) on a worker of pool `<pool>-rank<r>`: start that worker on machine r, with a limit of 1,
#
#   infra/team/worker.sh <pool>-rank<r> 1
#
# and it runs with RL4LLM_MACHINE_RANK=r (taken from the pool's name; a different RL4LLM_MACHINE_RANK already in
# the environment is refused). A worker of any other pool runs with machine rank 0 unless the environment says
# otherwise. RL4LLM_MAIN_PROCESS_IP / RL4LLM_MAIN_PROCESS_PORT, if set, pass on to the stage too.
set -euo pipefail
pool="${1:?usage: worker.sh <pool> [limit]}"
if [[ "$pool" =~ -rank([0-9]+)$ ]]; then
    rank="${BASH_REMATCH[1]}"
    if [[ -n "${RL4LLM_MACHINE_RANK:-}" && "$RL4LLM_MACHINE_RANK" != "$rank" ]]; then
        echo "worker.sh: pool $pool serves machine rank $rank, but RL4LLM_MACHINE_RANK=$RL4LLM_MACHINE_RANK" >&2
        exit 2
    fi
    export RL4LLM_MACHINE_RANK="$rank"
fi
export RL4LLM_PROJECT="$PWD"
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
exec prefect worker start --pool "$pool" --type process --name "$(hostname)-$pool" ${2:+--limit "$2"}
