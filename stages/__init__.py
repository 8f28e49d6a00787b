"""Stage entry points, models, and the pure algorithm and reward modules. Never imports Prefect."""
