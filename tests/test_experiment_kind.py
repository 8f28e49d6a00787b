"""The experiment is tagged as model training, so MLflow 3's UI opens on its runs, not on the GenAI overview."""

from __future__ import annotations

from pathlib import Path

from stages.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, training_experiment


def test_new_and_untagged_experiments_are_tagged_as_model_training_and_a_chosen_kind_is_kept(mlflow_server: str,
                                                                                             tmp_path: Path):
    from mlflow import MlflowClient

    client, name = MlflowClient(mlflow_server), tmp_path.name  # the session's server: names of this test's own
    created = training_experiment(client, f"{name}-new")
    untagged = client.create_experiment(f"{name}-made-before")
    chosen = client.create_experiment(f"{name}-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    assert training_experiment(client, f"{name}-made-before") == untagged
    assert training_experiment(client, f"{name}-chosen") == chosen
    kinds = {e: client.get_experiment(e).tags.get(EXPERIMENT_KIND_TAG) for e in (created, untagged, chosen)}
    assert kinds == {created: MODEL_TRAINING, untagged: MODEL_TRAINING, chosen: "genai_development"}
