"""The local files pipelines.yaml names, checked before anything runs: datasets (their columns and rows), model
directories and accelerate configs. Each problem is a `ConfigError` naming the file, pipeline, stage and key."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from flows.errors import ConfigError
from flows.schema import nearest
from flows.yaml_file import read_yaml
from stages import data
from stages.kinds import Input
from stages.spec import DataInput

MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
MODEL_CONFIGS = ("config.json", "adapter_config.json")  # a checkpoint's, a LoRA adapter's (models.ADAPTER_CONFIG)
GGUF, GGUF_MAGIC = ".gguf", b"GGUF"  # a llama.cpp model file: its suffix and first bytes


def names_local(name: str, root: Path) -> bool:
    """Whether an input's path names something local (a path, or a file or folder under `root`), not a Hub id: a
    path that does not exist counts when its first folder does (`models/smoll`: a typo, not a Hub repo)."""
    first = Path(name).parts[0] if Path(name).parts else ""
    return data.is_local(name, root) or Path(name).suffix == GGUF or name.startswith("~") or (
        "/" in name and (root / first).is_dir())


def check_dataset_file(file: str, root: Path, where: dict, dataset: DataInput, declared: Input):
    """A local input read once: a model (`declared.model`, or an input the kind reads no columns from that is no
    data file), else a dataset whose every row holds the columns `declared` needs (through the column mapping),
    with values of the right type."""
    name, split, path = dataset.path, dataset.split, root / dataset.path
    if not names_local(name, root):
        return  # a Hub id: checked when the stage loads it
    if declared.gguf:
        return check_model_source(file, where, name, path)
    if declared.model or not (declared.columns or declared.or_columns) and path.suffix not in data.LOCAL_FORMATS \
            and not any(path.glob(f"**/{split or 'train'}-*")):
        return check_model_dir(file, where, name, path)
    if not path.exists():
        raise ConfigError(file, f"dataset file not found: {name}", **where)
    mapped = dataset.columns
    try:
        rows = data.local_rows(path, split, name)
        first = next(rows)
        present = set(first[1])
        for ours, theirs in mapped.items():
            if theirs not in present:
                raise ConfigError(file, f"column '{theirs}' (mapped to '{ours}') not in {name}; "
                                        f"{nearest(theirs, present)}", **where)
        available = (present - set(mapped.values())) | set(mapped)
        required = declared.columns
        if declared.or_columns and set(declared.or_columns) <= available:
            required = declared.or_columns
        for column in required:
            if column in present and column not in available:
                raise ConfigError(file, _taken_message(name, column, mapped), **where)
            if column not in available:
                alternative = f" (or {', '.join(declared.or_columns)})" if declared.or_columns else ""
                raise ConfigError(file, f"dataset {name} has no column '{column}'{alternative} (map one with "
                                        f"columns: {{{column}: <its column>}}); columns: {sorted(present)}", **where)
        for row_where, row in itertools.chain([first], rows):
            data.check_row(row, row_where, {*required, *mapped}, mapped)
    except ValueError as e:
        raise ConfigError(file, str(e), **where) from None


def _taken_message(name: str, column: str, mapped: dict[str, str]) -> str:
    """Why the stage lacks `column` although dataset `name` has it: the mapping gives it to another name."""
    taken = next(ours for ours, theirs in mapped.items() if theirs == column)
    return (f"dataset {name}: its column '{column}' is mapped to '{taken}' (columns: {{{taken}: {column}}}), which "
            f"leaves the stage no '{column}'; a mapping reads {{stage's name: dataset's column}}: map '{column}' "
            f"too (columns: {{{column}: <its column>}}) or drop that mapping")


def check_stage_output(file: str, where: dict, ref: str, path: str, declared: Input) -> None:
    """An earlier stage's output read as a model must be one (not its data file, e.g. `synth.prompts`)."""
    if declared.model and Path(path).suffix in data.LOCAL_FORMATS:
        raise ConfigError(file, f"'{ref}' is a data file ({Path(path).name}), not a model: name a stage's model "
                                "output (`<stage>.model`)", **where)


def check_column_sources(file: str, pipeline: str, datasets: dict[str, DataInput]) -> list[ConfigError]:
    """Mappings that give one dataset column to two names: a column is renamed, not copied, so a stage would lack
    one of them."""
    errors = []
    for dataset, spec in datasets.items():
        named: dict[str, str] = {}
        for ours, theirs in spec.columns.items():
            if theirs in named:
                errors.append(ConfigError(
                    file, f"'{named[theirs]}' and '{ours}' both map to column '{theirs}' of {spec.path}; each "
                          "name needs a column of its own", pipeline=pipeline, key=f"datasets.{dataset}.columns"))
            named.setdefault(theirs, ours)
    return errors


def check_model_source(file: str, where: dict, name: str, path: Path) -> None:
    """What `import_model` converts: a GGUF file (named *.gguf, starting with GGUF's magic bytes) or a model
    directory (`check_model_dir`)."""
    if path.suffix != GGUF:
        return check_model_dir(file, where, name, path, " (a source is a save_pretrained directory, a *.gguf file "
                                                        "or a Hub id)")
    if not path.is_file():
        raise ConfigError(file, f"GGUF file not found: {name}{_home(name)}" if not path.exists() else
                                f"{name} is a directory, not a GGUF file", **where)
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConfigError(file, f"{name} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}", **where)


def _home(name: str) -> str:
    return " (~ is not expanded: paths are relative to pipelines.yaml's folder, or absolute)" * name.startswith("~")


def check_model_dir(file: str, where: dict, name: str, path: Path, alternative: str = "") -> None:
    """A local model: a directory holding a readable config.json (or a LoRA adapter's adapter_config.json)."""
    if not path.is_dir():
        raise ConfigError(file, f"model directory not found: {name}{_home(name)}{alternative}" if not path.exists()
                          else f"model {name} is a file, not a save_pretrained directory{alternative}", **where)
    config = next((path / c for c in MODEL_CONFIGS if (path / c).exists()), None)
    if config is None:
        raise ConfigError(file, f"model directory {name} has no config.json (not a save_pretrained directory)",
                          **where)
    label = f"{name}/{config.name}"
    try:
        parsed = json.loads(data.decode_utf8(config.read_bytes(), label))
    except json.JSONDecodeError as e:
        raise ConfigError(file, f"{label} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})", **where) \
            from None
    except ValueError as e:  # not UTF-8
        raise ConfigError(file, str(e), **where) from None
    if not isinstance(parsed, dict):
        raise ConfigError(file, f"{label}: expected a JSON object, got {data.short_repr(parsed)}", **where)


def check_accelerate_config(file: str, root: Path, where: dict, name: str) -> int:
    """An accelerate config file: a YAML mapping with a valid `num_processes` (returned: the processes of the whole
    run, across machines, what every global batch size divides by), `mixed_precision` and machines."""
    where = {**where, "key": "accelerate_config"}
    if not (root / name).exists():
        raise ConfigError(file, f"accelerate config not found: {name}", **where)
    try:
        config = read_yaml(root / name) or {}
    except ValueError as e:
        raise ConfigError(file, f"accelerate config {name}: {e}", **where) from None
    if not isinstance(config, dict):
        raise ConfigError(file, f"accelerate config {name}: expected a YAML mapping, got {data.short_repr(config)}",
                          **where)
    processes = config.get("num_processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(file, f"accelerate config {name}: num_processes must be a positive integer, got "
                                f"{data.short_repr(processes)}", **where)
    precision = config.get("mixed_precision", "no")
    if precision not in MIXED_PRECISION:
        hint = " (quote it: 'no')" if precision is False else ""
        raise ConfigError(file, f"accelerate config {name}: mixed_precision must be one of "
                                f"{', '.join(MIXED_PRECISION)}, got {data.short_repr(precision)}{hint}", **where)
    problem = machines_problem(config, processes)
    if problem:
        raise ConfigError(file, f"accelerate config {name}: {problem}", **where)
    return processes


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def machines_problem(config: dict, processes: int) -> str | None:
    """What is wrong with an accelerate config's machines (None: nothing): `num_machines` a positive integer that
    divides `num_processes` (the total; each machine runs num_processes / num_machines), `machine_rank` 0 (the
    file is the same on every machine: each machine's rank comes from RL4LLM_MACHINE_RANK), and with several
    machines the main process's address and port."""
    machines = config.get("num_machines", 1)
    if not positive_int(machines):
        return f"num_machines must be a positive integer, got {data.short_repr(machines)}"
    if processes % machines:
        return (f"num_processes ({processes}, the total across machines) must divide by num_machines ({machines}): "
                "every machine runs the same number of processes")
    if config.get("machine_rank", 0) != 0:
        return (f"machine_rank must be 0, got {data.short_repr(config['machine_rank'])}: the file is the same on "
                "every machine (a stage's dependency); set each machine's rank in RL4LLM_MACHINE_RANK")
    if machines == 1:
        return None
    ip, port = config.get("main_process_ip"), config.get("main_process_port")
    if not isinstance(ip, str) or not ip:
        return f"num_machines is {machines}: main_process_ip must name machine 0's address, got {data.short_repr(ip)}"
    if not positive_int(port) or port > 65535:
        return f"num_machines is {machines}: main_process_port must be a TCP port (1-65535), got " \
            f"{data.short_repr(port)}"
    return None
