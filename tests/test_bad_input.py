"""Bad input, named, at once: broken data files, accelerate configs, model directories, alias bombs and names fail
before anything trains or is written, naming the file, the line or row and the column; `rl4llm` exits 2."""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.config import resolve
from flows.errors import ConfigError
from flows.preflight import check_tracking_server
from stages import data
from stages.context import StageContext
from stages.kinds import get_kind
from stages.spec import DataInput, ResolvedStage
from tests.conftest import Tracker, free_port
from tests.test_config import BASE, write

GOOD = {"question": "name two animals", "answer": "cat dog"}


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def config_with(edit=None) -> dict:
    config = copy.deepcopy(BASE)
    if edit:
        edit(config["pipelines"]["demo"])
    return config


def error_of(project: Path, config: dict | None = None, files: dict[str, str | bytes] | None = None,
             raw: str | None = None) -> ConfigError:
    """The ConfigError `resolve` raises on BASE (or `config`, or the YAML text `raw`) with `files` written."""
    path = write(project, config or BASE)
    for name, content in (files or {}).items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes(content.encode() if isinstance(content, str) else content)
    if raw is not None:
        path.write_text(raw)
    with pytest.raises(ConfigError) as raised:
        resolve(path)
    return raised.value


def use(path: str, **dataset):
    return lambda p: p["datasets"]["demos"].update(path=path, **dataset)


def chat_folder(project: Path, rows: list[dict]) -> None:
    from datasets import Dataset

    (project / "chat/data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(project / "chat/data/train-00000-of-00001.parquet")


BAD_DATA = {
    "empty file": ({"demos.jsonl": ""}, None, "demos.jsonl: no rows"),
    "malformed JSON line": ({"demos.jsonl": lines(GOOD, GOOD, '{"question": "q", "answer": }')}, None,
                            "demos.jsonl line 3: invalid JSON (Expecting value"),
    "not a JSON object": ({"demos.jsonl": lines(GOOD, "[1, 2]")}, None,
                          "demos.jsonl line 2: expected a JSON object, got [1, 2]"),
    "not UTF-8": ({"demos.jsonl": lines(GOOD).encode() + b'{"question": "caf\xe9", "answer": "x"}\n'}, None,
                  "demos.jsonl line 2 column 18: not UTF-8 (byte 0xe9)"),
    ".json not JSON": ({"demos.json": "question: answer\n"}, use("demos.json"),
                       "demos.json line 1 column 1: invalid JSON (Expecting value)"),
    ".json missing column": ({"demos.json": json.dumps([GOOD, {"question": "q"}])}, use("demos.json"),
                             "demos.json row 2: column 'answer' (mapped to 'response') missing"),
    "mapped column missing on line 3": ({"demos.jsonl": lines(GOOD, GOOD, {"question": "q"})}, None,
                                        "demos.jsonl line 3: column 'answer' (mapped to 'response') missing"),
    "mapped column null": ({"demos.jsonl": lines(GOOD, {"question": "q", "answer": None})}, None,
                           "demos.jsonl line 2: column 'answer' (mapped to 'response') missing"),
    "required column missing": ({"plain.jsonl": lines({"prompt": "p", "response": "r"}, {"prompt": "p"})},
                                use("plain.jsonl", columns={}), "plain.jsonl line 2: column 'response' missing"),
    "wrong type on line 2": ({"demos.jsonl": lines(GOOD, {"question": "q", "answer": 42})}, None,
                             "demos.jsonl line 2: column 'answer' (mapped to 'response') must be a string or a "
                             "list of {role, content} messages, got 42"),
    "prompt a number": ({"plain.jsonl": lines({"prompt": 7, "response": "r"})}, use("plain.jsonl", columns={}),
                        "plain.jsonl line 1: column 'prompt' must be a string or a list of {role, content} "
                        "messages, got 7"),
    "csv missing value": ({"demos.csv": "question,answer\nq,a\nq\n"}, use("demos.csv"),
                          "demos.csv line 3: column 'answer' (mapped to 'response') missing"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_local_data_is_named_by_file_line_and_column(project: Path, case: str):
    files, edit, expected = BAD_DATA[case]
    error = error_of(project, config_with(edit), files)
    assert expected in str(error), str(error)
    assert (error.pipeline, error.stage, error.key) == ("demo", "sft", "inputs.data")


def test_bad_chat_messages_in_a_hub_layout_folder_name_the_parquet_row(project: Path):
    good = {"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    chat_folder(project, [good, good, {"conversation": [{"role": "user", "content": None}]}])
    chat = {"path": "chat", "columns": {"messages": "conversation"}}
    sft = {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.chat"}}
    config = config_with(lambda p: p.update(datasets={"chat": chat}, stages=[sft]))
    message = str(error_of(project, config))
    assert "chat/data/train-00000-of-00001.parquet row 3: column 'conversation' (mapped to 'messages') must be a " \
           "list of {role, content} messages" in message, message


def test_hub_rows_are_checked_when_a_stage_loads_them(monkeypatch):
    from datasets import Dataset

    chat = [{"role": "user", "content": "hi"}]
    rows = [{"messages": chat, "answer": "a"}, {"messages": [{"role": "user", "content": None}], "answer": "a"}]
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: Dataset.from_list(rows))
    spec = DataInput(path="someone/chat", columns={"response": "answer"})
    with pytest.raises(ValueError, match=r"someone/chat \(split train\) row 2: column 'messages' must be a list of"):
        data.load_rows(spec)
    rows[1] = {"messages": chat, "answer": None}
    with pytest.raises(ValueError, match=r"someone/chat \(split train\) row 2: column 'response' missing"):
        data.load_rows(spec)
    rows[1] = {"messages": chat, "answer": "a"}
    assert len(data.load_rows(spec, ("prompt",), or_columns=("messages",))) == 2  # chat rows: messages suffice
    rows[1] = {"answer": "a"}
    with pytest.raises(ValueError, match=r"someone/chat \(split train\) row 2: column 'messages' missing"):
        data.load_rows(spec, ("prompt",), or_columns=("messages",))
    with pytest.raises(ValueError, match=r"row 1: column 'prompt' missing"):
        data.load_rows(spec, ("prompt",))


BAD_ACCELERATE = {
    "a directory": (None, "accelerate config infra/bad: a directory, not a file"),
    "not YAML": ("num_processes: [1\n", "accelerate config infra/bad: line 2 column 1: invalid YAML"),
    "not a mapping": ("- 1\n", "accelerate config infra/bad: expected a YAML mapping, got [1]"),
    "num_processes two": ("num_processes: two\n", "num_processes must be a positive integer, got 'two'"),
    "num_processes 0": ("num_processes: 0\n", "num_processes must be a positive integer, got 0"),
    "num_processes -1": ("num_processes: -1\n", "num_processes must be a positive integer, got -1"),
    "num_processes true": ("num_processes: true\n", "num_processes must be a positive integer, got True"),
    "mixed_precision fp32": ("mixed_precision: fp32\n",
                             "mixed_precision must be one of no, fp16, bf16, fp8, got 'fp32'"),
    "mixed_precision unquoted no": ("mixed_precision: no\n", "got False (quote it: 'no')"),
}


@pytest.mark.parametrize("case", BAD_ACCELERATE, ids=list(BAD_ACCELERATE))
def test_bad_accelerate_config(project: Path, case: str):
    content, expected = BAD_ACCELERATE[case]
    if content is None:
        (project / "infra/bad").mkdir()
    else:
        (project / "infra/bad").write_text(content)
    error = error_of(project, config_with(lambda p: p["stages"][0].update(accelerate_config="infra/bad")))
    assert expected in str(error), str(error)
    assert (error.pipeline, error.stage, error.key) == ("demo", "sft", "accelerate_config")


def test_valid_accelerate_configs_resolve_with_their_process_count(project: Path):
    resolved = resolve(write(project, config_with(lambda p: p["stages"][0].update(
        accelerate_config="infra/accelerate/fsdp_cpu_2proc.yaml"))))
    assert resolved.stages["demo"]["sft"].num_processes == 2 and resolved.stages["demo"]["rm"].num_processes == 1


BAD_MODELS = {
    "missing directory": ("./models/missing", None, "model directory not found: ./models/missing"),
    "no config.json": ("models/empty", {"models/empty/model.safetensors": b""},
                       "model directory models/empty has no config.json"),
    "config.json not JSON": ("models/broken", {"models/broken/config.json": '{"model_type": llama}'},
                             "models/broken/config.json line 1 column 16: invalid JSON"),
}


@pytest.mark.parametrize("case", BAD_MODELS, ids=list(BAD_MODELS))
def test_bad_local_model_directory(project: Path, case: str):
    model, files, expected = BAD_MODELS[case]
    error = error_of(project, config_with(lambda p: p["defaults"].update(model=model)), files)
    assert expected in str(error), str(error)
    assert (error.pipeline, error.stage, error.key) == ("demo", "sft", "model")


def test_a_model_input_wired_to_a_local_directory_is_checked(project: Path):
    (project / "models/empty").mkdir(parents=True)
    config = config_with(lambda p: (p["datasets"].update(base={"path": "./models/empty"}),
                                    p["stages"][0]["inputs"].update(base="datasets.base")))
    error = error_of(project, config)
    assert error.key == "inputs.base" and "model directory ./models/empty has no config.json" in str(error)


def test_hub_ids_and_good_model_directories_pass(project: Path, tiny_model_dir: Path):
    for model in ("Qwen/Qwen2-0.5B", str(tiny_model_dir)):
        assert resolve(write(project, config_with(lambda p: p["defaults"].update(model=model))))


def test_a_truncated_safetensors_file_is_named_before_from_pretrained(tiny_model_dir: Path, tmp_path: Path):
    from stages.models import check_safetensors, load_policy

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    check_safetensors(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        load_policy(str(model))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt safetensors file \(unreadable"):
        check_safetensors(model)


def test_a_safetensors_file_written_by_safetensors_passes_and_any_cut_fails(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from stages.models import check_safetensors

    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5)}, tmp_path / "x.safetensors", metadata={"format": "pt"})
    check_safetensors(tmp_path)
    whole = (tmp_path / "x.safetensors").read_bytes()
    for cut in (1, 20, len(whole) - 9, len(whole) - 4):
        (tmp_path / "x.safetensors").write_bytes(whole[:-cut])
        with pytest.raises(ValueError, match="x.safetensors: truncated or corrupt"):
            check_safetensors(tmp_path)


def alias_bomb(levels: int = 9, refs: int = 9) -> str:
    """A "billion laughs" in a param value: `levels` nested anchors of `refs` aliases each (refs ** levels lols)."""
    anchors = ["&a0 [" + ", ".join(["lol"] * refs) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * refs) + "]" for i in range(1, levels + 1)]
    return yaml.safe_dump(BASE).replace("lr: 0.01", f"lr: [{', '.join(anchors)}]")


def test_a_yaml_alias_bomb_is_rejected_at_once(project: Path):
    assert "*a8" in alias_bomb()
    started = time.perf_counter()
    error = error_of(project, raw=alias_bomb())
    assert time.perf_counter() - started < 10  # ~0.01 s; it took 161 s and 3.9 GB when the error printed the value
    assert "aliases expand to more than 10,000 nodes" in str(error)


def test_a_recursive_alias_is_rejected(project: Path):
    error = error_of(project, raw=yaml.safe_dump(BASE).replace("lr: 0.01", "lr: &a [*a]"))
    assert "invalid YAML (a recursive alias" in str(error)


def test_error_messages_print_bounded_values(project: Path):
    error = error_of(project, config_with(lambda p: p["stages"][0]["params"].update(lr="x" * 100_000)))
    assert error.key == "params.lr" and "(got 'xxx" in str(error) and len(str(error)) < 400


def test_a_pipeline_name_with_a_trailing_newline_is_rejected(project: Path):
    config = copy.deepcopy(BASE)
    config["pipelines"]["demo\n"] = config["pipelines"].pop("demo")
    error = error_of(project, config)
    assert "pipeline name 'demo\\n' must match" in str(error)


def test_a_stage_name_with_a_trailing_newline_is_rejected(project: Path):
    error = error_of(project, config_with(lambda p: p["stages"][0].update(name="sft\n")))
    assert (error.stage, error.key) == ("sft\n", "name") and "stage 'sft\\n'" in str(error)


def test_invalid_pipelines_yaml_names_line_and_column(project: Path):
    error = error_of(project, raw="pipelines:\n  demo:\n    stages: [\n")
    assert str(error).startswith(f"{project / 'pipelines.yaml'}: line 4 column 1: invalid YAML")


def cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, capture_output=True, text=True)


def tree(project: Path) -> list[str]:
    return sorted(str(p.relative_to(project)) for p in project.rglob("*"))


def test_cli_run_exits_2_on_a_bad_data_line_and_writes_nothing(project: Path):
    write(project, BASE)
    (project / "demos.jsonl").write_text(lines(GOOD, GOOD, {"question": "q", "answer": ["a"]}))
    before = tree(project)
    result = cli(project, "run", "demo")
    assert result.returncode == 2, result.stderr
    assert "demos.jsonl line 3: column 'answer' (mapped to 'response') must be a string" in result.stderr
    assert "Traceback" not in result.stderr and tree(project) == before


@pytest.mark.parametrize("case", ["num_processes two", "alias bomb"])
def test_cli_validate_exits_2_on_a_bad_accelerate_config_or_alias_bomb(project: Path, case: str):
    path = write(project, config_with(lambda p: p["stages"][0].update(accelerate_config="infra/bad.yaml")))
    (project / "infra/bad.yaml").write_text("num_processes: two\n")
    if case == "alias bomb":
        path.write_text(alias_bomb())
    before = tree(project)
    result = cli(project, "validate")
    assert result.returncode == 2, result.stderr
    expected = "num_processes must be a positive integer, got 'two'" if case == "num_processes two" else \
        "aliases expand to more than 10,000 nodes"
    assert "pipelines.yaml" in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and tree(project) == before


def test_an_unreachable_tracking_server_is_named_with_the_cause():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(ConfigError) as raised:
        check_tracking_server(uri, timeout_s=2)
    assert time.perf_counter() - started < 10
    assert str(raised.value).startswith(f"{uri}: MLflow tracking server not reachable (") and "refused" in \
        str(raised.value)


def test_cli_run_against_an_unreachable_tracking_server_fails_before_any_stage(project: Path):
    write(project, BASE)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "demo"], cwd=project, capture_output=True,
                            text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and f"error: {uri}: MLflow tracking server not reachable" in result.stderr
    assert elapsed < 30, elapsed  # the check itself gives up after 5 s; the rest is start-up
    assert not (project / "artifacts").exists() and not (project / "dvc.lock").exists()
    print(f"unreachable tracking server: exit 2 after {elapsed:.1f} s")


@pytest.mark.parametrize("status", [200, 503])
def test_a_tracking_server_answering_health(status: int):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}/"
    try:
        if status == 200:
            check_tracking_server(uri)
        else:
            with pytest.raises(ConfigError, match="not reachable \\(HTTP 503"):
                check_tracking_server(uri)
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_database_in_a_missing_directory(tmp_path: Path):
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="directory does not exist"):
        check_tracking_server(uri)


@pytest.mark.parametrize("output_dir, outputs", [
    ("../outside", {"model": "../outside/model"}),
    ("artifacts/demo/other", {"model": "artifacts/demo/other/model"}),
    ("artifacts/demo/sft", {"model": "/etc/passwd"}),
    ("artifacts/demo/sft", {"model": "artifacts/demo/sft"}),
])
def test_a_stage_writes_only_inside_its_own_output_directory(tmp_path, monkeypatch, output_dir, outputs):
    from stages.runner import owned_output_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must lie in artifacts/demo/sft/"):
        owned_output_dir(tmp_path, "demo", "sft", ResolvedStage.model_construct(output_dir=output_dir, outputs=outputs),
                         "params.yaml")
    spec = ResolvedStage.model_construct(output_dir="artifacts/demo/sft", outputs={"model": "artifacts/demo/sft/model"})
    assert owned_output_dir(tmp_path, "demo", "sft", spec, "params.yaml") == tmp_path / "artifacts/demo/sft"


def line_of(text: str, line: str, nth: int = 0) -> int:
    """The 1-based number of the `nth` line of `text` equal to `line`."""
    return [i for i, x in enumerate(text.splitlines(), 1) if x == line][nth]


def duplicated(case: str) -> tuple[str, str]:
    """BASE as YAML with a key twice in one mapping, and the message that names it."""
    text = yaml.safe_dump(BASE)
    if case == "a param twice":
        text = text.replace("        lr: 0.01\n", "        lr: 0.01\n        lr: 0.5\n")
        return text, (f"pipelines.yaml: line {line_of(text, '        lr: 0.5')} column 9: invalid YAML (duplicate key "
                      f"'lr' in pipelines.demo.stages[0].params, first on line {line_of(text, '        lr: 0.01')})")
    text = text.replace("pipelines:\n", "pipelines:\n  demo:\n    stages: []\n")
    return text, (f"pipelines.yaml: line {line_of(text, '  demo:', 1)} column 3: invalid YAML (duplicate key 'demo' "
                  "in pipelines, first on line 2)")


@pytest.mark.parametrize("case", ["a param twice", "a pipeline twice"])
def test_cli_validate_exits_2_on_a_duplicate_key_and_writes_nothing(project: Path, case: str):
    text, expected = duplicated(case)
    write(project, BASE).write_text(text)
    before = tree(project)
    result = cli(project, "validate")
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and tree(project) == before
    assert cli(project, "sync").returncode == 2 and tree(project) == before  # no params.yaml, no dvc.yaml


def test_a_duplicate_key_in_an_accelerate_config_is_named_by_line(project: Path):
    (project / "infra/bad.yaml").write_text("num_processes: 1\nmixed_precision: 'no'\nnum_processes: 2\n")
    error = error_of(project, config_with(lambda p: p["stages"][0].update(accelerate_config="infra/bad.yaml")))
    assert "accelerate config infra/bad.yaml: line 3 column 1: invalid YAML (duplicate key 'num_processes', first " \
           "on line 1)" in str(error), str(error)
    assert (error.stage, error.key) == ("sft", "accelerate_config")


def test_merge_keys_may_override_what_they_merge(project: Path):
    text = yaml.safe_dump(BASE).replace("    defaults:\n", "    defaults: &shared\n").replace(
        "        lr: 0.01\n", "        lr: 0.01\n      <<: *shared\n      seed: 7\n")
    assert "<<: *shared" in text
    write(project, BASE).write_text(text)
    assert resolve(project / "pipelines.yaml").stages["demo"]["sft"].seed == 7


PLAIN = lines({"prompt": "name two animals", "response": "cat dog"})
BAD_MAPPINGS = {  # columns of plain.jsonl ({prompt, response}) -> (key, message)
    "a column given away": ({"prompt": "response"}, "inputs.data",
                            "dataset plain.jsonl: its column 'response' is mapped to 'prompt' (columns: {prompt: "
                            "response}), which leaves the stage no 'response'"),
    "one column to two names": ({"prompt": "response", "response": "response"}, "datasets.demos.columns",
                                "'prompt' and 'response' both map to column 'response' of plain.jsonl; each name "
                                "needs a column of its own"),
}


@pytest.mark.parametrize("case", BAD_MAPPINGS, ids=list(BAD_MAPPINGS))
def test_cli_validate_checks_a_column_mapping_against_the_files_columns(project: Path, case: str):
    columns, key, expected = BAD_MAPPINGS[case]
    (project / "plain.jsonl").write_text(PLAIN)
    error = error_of(project, config_with(use("plain.jsonl", columns=columns)))
    assert expected in str(error) and error.key == key and error.pipeline == "demo", str(error)
    before = tree(project)
    result = cli(project, "validate")
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and tree(project) == before


def test_a_mapping_may_swap_the_files_columns(project: Path):
    (project / "plain.jsonl").write_text(PLAIN)
    sft = {"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos"}}
    columns = {"prompt": "response", "response": "prompt"}
    config = config_with(lambda p: (use("plain.jsonl", columns=columns)(p), p.update(stages=[sft])))
    spec = resolve(write(project, config)).stages["demo"]["sft"].inputs["data"]
    assert data.load_rows(spec, ("prompt", "response")) == [{"prompt": "cat dog", "response": "name two animals"}]


def long_row_project(project: Path, tiny_model_dir: Path, long_input: str) -> None:
    """BASE's sft on the tiny model (64 positions), its line 3 of `long_input` (data or eval) 200 words long."""
    def edit(p: dict) -> None:
        p["defaults"]["model"] = str(tiny_model_dir)
        p["datasets"]["prompts"] = {"path": "prompts.jsonl"}
        p["stages"] = [{"name": "sft", "kind": "sft", "inputs": {"data": "datasets.demos", "eval": "datasets.prompts"},
                        "params": {"epochs": 1, "evaluator": "instruct_gold"}}]

    write(project, config_with(edit))
    long = {"question": "name " * 200, "answer": "cat dog"}
    demos = [GOOD, GOOD, long if long_input == "data" else GOOD, GOOD]
    prompts = [{"prompt": "name two animals"}] * 2 + [{"prompt": "name " * 200 if long_input == "eval" else "name"}]
    (project / "demos.jsonl").write_text(lines(*demos))
    (project / "prompts.jsonl").write_text(lines(*prompts))
    assert cli(project, "sync").returncode == 0


LONG_ROWS = {
    "data": "error: demo/sft bad input: ValueError: demos.jsonl line 3: 205 tokens, more than the model's context "
            "(max_position_embeddings=64), and max_length is not set; set params.max_length (at most 64) to "
            "truncate rows",
    "eval": "error: demo/sft bad input: ValueError: prompts.jsonl line 3: a prompt of 202 tokens, with "
            "eval_max_new_tokens=16, is more than the model's context (max_position_embeddings=64)",
}


@pytest.mark.parametrize("long_input", LONG_ROWS)
def test_a_row_longer_than_the_models_context_is_refused_before_training(project: Path, tiny_model_dir: Path,
                                                                         long_input: str):
    long_row_project(project, tiny_model_dir, long_input)
    result = cli(project, "stage", "demo", "sft")
    assert result.returncode == 2 and LONG_ROWS[long_input] in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (project / "artifacts/demo/sft").exists()  # nothing published


def test_max_length_truncates_what_the_context_refuses_and_rows_are_named_by_file_line(project: Path):
    from stages.text import fit_rows

    (project / "demos.jsonl").write_text(lines(GOOD, "", GOOD, GOOD))  # row 2 is on line 4 (a blank line 2)
    spec = DataInput(path="demos.jsonl", columns={"prompt": "question", "response": "answer"})
    encoded = [([1] * 3, [2] * 3, None), ([1] * 3, [2] * 3, None), ([1] * 50, [2] * 50, None)]
    name = functools.partial(data.row_name, spec)
    with pytest.raises(ValueError, match=r"^demos.jsonl line 4: 100 tokens, more than the model's context "
                                         r"\(max_position_embeddings=64\), and max_length is not set"):
        fit_rows(encoded, "input 'data'", None, None, 64, name)
    with pytest.raises(ValueError, match=r"^demos.jsonl line 4: 100 tokens, .*, and max_length=100 is larger"):
        fit_rows(encoded, "input 'data'", None, 100, 64, name)
    fitted, truncated = fit_rows(encoded, "input 'data'", None, 64, 64, name)
    assert truncated == 1 and [len(p) + len(r) for p, r, _ in fitted] == [6, 6, 64]
    assert data.row_name(DataInput(path="someone/chat", split="test"), 1) == "someone/chat (split test) row 2"


MODEL = "the tiny model"  # an input given the tiny model's directory
SHORT, LONG = "name two animals", "name " * 200  # 5 and 202 prompt tokens with the tiny model's chat template
PAIR = {"prompt": SHORT, "chosen": "cat dog", "rejected": "red blue"}
LONG_PAIR = {"prompt": SHORT, "chosen": "cat " * 100, "rejected": "dog"}  # 5 + 101 tokens
DEMO, LONG_DEMO = {"prompt": SHORT, "response": "cat dog"}, {"prompt": SHORT, "response": "cat " * 100}
CONTEXT = "is more than the model's context (max_position_embeddings=64)"
ROW_OVER = "106 tokens, more than the model's context (max_position_embeddings=64), and max_length is not set; set " \
           "params.max_length (at most 64) to truncate rows"
REFUSALS = {  # case -> (kind, inputs: rows or MODEL, params, the error)
    "reward_model comparisons": ("reward_model", {"base": MODEL, "comparisons": [PAIR, LONG_PAIR], "demos": [DEMO]},
                                 {}, f"comparisons.jsonl line 2: {ROW_OVER}"),
    "reward_model eval_comparisons": ("reward_model", {"base": MODEL, "comparisons": [PAIR], "demos": [DEMO],
                                                       "eval_comparisons": [LONG_PAIR]},
                                      {}, f"eval_comparisons.jsonl line 1: {ROW_OVER}"),
    "reward_model demos": ("reward_model", {"base": MODEL, "comparisons": [PAIR], "demos": [DEMO, DEMO, LONG_DEMO]},
                           {"max_length": 100}, "demos.jsonl line 3: 100 tokens, more than the model's context "
                           "(max_position_embeddings=64), and max_length=100 is larger; set params.max_length (at "
                           "most 64) to truncate rows"),
    "dpo comparisons": ("dpo", {"policy": MODEL, "comparisons": [PAIR, LONG_PAIR]}, {},
                        f"comparisons.jsonl line 2: {ROW_OVER}"),
    "dpo prompt fills max_length": ("dpo", {"policy": MODEL, "comparisons": [PAIR, {**PAIR, "prompt": "name " * 40}]},
                                    {"max_length": 30}, "comparisons.jsonl line 2 cannot fit: the prompt alone (42 "
                                    "tokens) fills max_length=30; raise max_length or set max_prompt_length"),
    "dpo KTO mismatched pair": ("dpo", {"policy": MODEL, "comparisons": [
        {"prompt": "name " * 40, "completion": "cat", "label": True},  # 42 + 2 tokens
        {"prompt": "name", "completion": "cat " * 40, "label": False}]},  # 3 + 41: crossed, 42 + 41
        {"loss": "kto"}, "input 'comparisons' (comparisons.jsonl): the kl_completion of training example 0: 83 "
        "tokens, more than the model's context (max_position_embeddings=64), and max_length is not set; set "
        "params.max_length (at most 64) to truncate rows"),
    "dpo held-out KL prompt": ("dpo", {"policy": MODEL, "comparisons": [PAIR],
                                       "eval_comparisons": [{**PAIR, "prompt": "name " * 51}]}, {},
                               f"eval_comparisons.jsonl line 1: a prompt of 53 tokens, with max_new_tokens=12, "
                               f"{CONTEXT}; shorten it or lower max_new_tokens"),
    "dpo evaluator": ("dpo", {"policy": MODEL, "comparisons": [PAIR], "eval": [{"prompt": SHORT}]},
                      {"evaluator": "instruct_gold", "eval_max_new_tokens": 60},
                      f"eval.jsonl line 1: a prompt of 5 tokens, with eval_max_new_tokens=60, {CONTEXT}; shorten it "
                      "or lower eval_max_new_tokens"),
    "grpo prompts": ("grpo", {"policy": MODEL, "prompts": [{"prompt": SHORT}, {"prompt": LONG}]}, {},
                     f"prompts.jsonl line 2: a prompt of 202 tokens, with max_new_tokens=24, {CONTEXT}; set "
                     "max_prompt_length (at most 40) or lower max_new_tokens"),
    "grpo max_prompt_length": ("grpo", {"policy": MODEL, "prompts": [{"prompt": SHORT}, {"prompt": LONG}]},
                               {"max_prompt_length": 50}, "prompts.jsonl line 2: a prompt of 202 tokens (cut to "
                               f"max_prompt_length=50), with max_new_tokens=24, {CONTEXT}; set max_prompt_length (at "
                               "most 40) or lower max_new_tokens"),
    "grpo max_new_tokens": ("grpo", {"policy": MODEL, "prompts": [{"prompt": SHORT}]}, {"max_new_tokens": 64},
                            f"prompts.jsonl line 1: a prompt of 5 tokens, with max_new_tokens=64, {CONTEXT}; lower "
                            "max_new_tokens (below 64)"),
    "grpo evaluator": ("grpo", {"policy": MODEL, "prompts": [{"prompt": SHORT}], "eval": [{"prompt": LONG}]},
                       {"evaluator": "instruct_gold"}, f"eval.jsonl line 1: a prompt of 202 tokens, with "
                       f"eval_max_new_tokens=16, {CONTEXT}; shorten it or lower eval_max_new_tokens"),
    "ppo prompts": ("ppo", {"policy": MODEL, "reward": MODEL, "prompts": [{"prompt": SHORT}, {"prompt": LONG}]}, {},
                    f"prompts.jsonl line 2: a prompt of 202 tokens, with max_new_tokens=12, {CONTEXT}; set "
                    "max_prompt_length (at most 52) or lower max_new_tokens"),
    "ppo final KL": ("ppo", {"policy": MODEL, "reward": MODEL, "prompts": [{"prompt": SHORT}],
                             "eval": [{"prompt": "name " * 51}]}, {},
                     f"eval.jsonl line 1: a prompt of 53 tokens, with max_new_tokens=12, {CONTEXT}; shorten it or "
                     "lower max_new_tokens"),
    "rejection_sampling": ("rejection_sampling", {"policy": MODEL, "prompts": [{"prompt": LONG}]}, {},
                           f"prompts.jsonl line 1: a prompt of 202 tokens, with max_new_tokens=24, {CONTEXT}; set "
                           "max_prompt_length (at most 40) or lower max_new_tokens"),
    "label_preferences": ("label_preferences", {"policy": MODEL, "prompts": [{"prompt": SHORT}] * 2 + [{"prompt": LONG}]},
                          {}, f"prompts.jsonl line 3: a prompt of 202 tokens, with max_new_tokens=12, {CONTEXT}; "
                          "shorten it or lower max_new_tokens"),
}


def stage_context(kind_name: str, inputs: dict[str, Any], model: Path, **params) -> StageContext:
    """A `kind_name` stage in the current directory: MODEL inputs are `model`, the others rows written to
    <input>.jsonl; outputs under out/."""
    from accelerate import Accelerator

    kind, out = get_kind(kind_name), Path("out")
    for name, rows in inputs.items():
        if rows != MODEL:
            Path(f"{name}.jsonl").write_text(lines(*rows))
    specs = {name: DataInput(path=str(model) if rows == MODEL else f"{name}.jsonl") for name, rows in inputs.items()}
    return StageContext("demo", kind_name, 0, kind.params(**params), specs,
                        {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                        Tracker(), declared=kind.inputs)


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_what_cannot_fit_the_models_context_is_refused_at_stage_start(project: Path, tiny_model_dir: Path,
                                                                       case: str):
    kind_name, inputs, params, expected = REFUSALS[case]
    ctx = stage_context(kind_name, inputs, tiny_model_dir, **params)
    with pytest.raises(ValueError) as raised:
        get_kind(kind_name).load_run()(ctx)
    assert str(raised.value) == expected
    assert ctx.tracker.logged == [] and not ctx.output_dir.exists()  # before any step, sample or output


def test_a_prompt_cut_to_fit_passes(project: Path, tiny_model_dir: Path):
    from stages.models import load_tokenizer
    from stages.text import check_prompts_fit

    ctx = stage_context("grpo", {"prompts": [{"prompt": LONG}]}, tiny_model_dir, max_prompt_length=40)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    check_prompts_fit(ctx, tokenizer, 64, "prompts", "max_new_tokens", cut=True)  # 40 + 24 tokens: no error
    with pytest.raises(ValueError, match=r"^prompts.jsonl line 1: a prompt of 202 tokens, with max_new_tokens=24"):
        check_prompts_fit(ctx, tokenizer, 64, "prompts", "max_new_tokens")  # not cut (as eval prompts are not)


@pytest.mark.parametrize("kind_name", ["sft", "distill", "reward_model", "dpo"])
def test_max_length_says_what_none_means(kind_name: str):
    assert get_kind(kind_name).params.model_fields["max_length"].description.endswith(
        "None: all, up to the model's context")


def import_config(source: str) -> dict:
    """BASE with an import_model stage first, reading `source`."""
    return config_with(lambda p: p["stages"].insert(0, {"name": "import", "kind": "import_model",
                                                        "inputs": {"source": source}}))


BAD_SOURCES = {
    "missing GGUF file": ("models/SmolLM2.gguf", {"models/keep": ""}, "GGUF file not found: models/SmolLM2.gguf"),
    "not a GGUF file": ("models/m.gguf", {"models/m.gguf": b"<html>404</html>"},
                        "models/m.gguf is not a GGUF file: it starts with b'<htm', not b'GGUF'"),
    "a directory named .gguf": ("models/d.gguf", {"models/d.gguf/x": ""}, "models/d.gguf is a directory, not a GGUF"),
    "a data file": ("demos.jsonl", {}, "model demos.jsonl is a file, not a save_pretrained directory (a source is a "
                                      "save_pretrained directory, a *.gguf file or a Hub id)"),
    "a typo under models/": ("models/smoll", {"models/keep": ""}, "model directory not found: models/smoll"),
    "~ not expanded": ("~/models/x.gguf", {}, "GGUF file not found: ~/models/x.gguf (~ is not expanded"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_a_bad_import_source_is_named_at_validate_time(project: Path, case: str):
    source, files, expected = BAD_SOURCES[case]
    error = error_of(project, import_config(source), files)
    assert expected in str(error), str(error)
    assert (error.pipeline, error.stage, error.key) == ("demo", "import", "inputs.source")


def test_a_model_input_reading_an_earlier_stages_data_file_is_refused(project: Path):
    config = config_with(lambda p: p["stages"].extend([
        {"name": "synth", "kind": "synthetic_reasoning"},
        {"name": "import", "kind": "import_model", "inputs": {"source": "synth.prompts"}}]))
    error = error_of(project, config)
    assert (error.stage, error.key) == ("import", "inputs.source")
    assert "'synth.prompts' is a data file (prompts.jsonl), not a model" in str(error)


@pytest.mark.parametrize("wiring", ["path", "dataset"])
def test_a_typo_in_a_model_input_path_is_named_not_taken_for_a_hub_id(project: Path, tiny_model_dir: Path,
                                                                     wiring: str):
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    ref = "models/tiyn" if wiring == "path" else "datasets.tiny"
    error = error_of(project, config_with(lambda p: (p["datasets"].update(tiny={"path": "models/tiyn"}),
                                                     p["stages"][0]["inputs"].update(base=ref))))
    assert (error.stage, error.key) == ("sft", "inputs.base")
    assert "model directory not found: models/tiyn" in str(error)
