"""Pipeline side: config schema, CLI, Prefect flow, DVC calls, MLflow parent runs. Never trains."""
