"""GRPO through the hf and the vllm rollout engine: seconds per iteration, where they go, and generation tokens/s.

    python benchmarks/vllm_rollout.py [--tiny-model DIR] [--model DIR] [--rounds 2] [--iterations 3]
                                      [--only tiny|135m] [--quiet-load 0.7] [--json FILE]

Two tasks, each through the real grpo stage code (in this process, a `StageContext` as `rl4llm stage` builds, the
stage's own engine: `rollout: {engine: hf}` or `{engine: vllm}`, the latter a vLLM server the stage starts from
`.venv-vllm` and pushes weights to after every update):

- tiny: the deepseek-r1-zero-vllm pipeline's pretrained model (its `data` and `pretrain` stages run here with the
  pipeline's params from pipelines.yaml, cached under --cache; or --tiny-model DIR) on its prompts, with its grpo
  params (16 prompts x 8 samples x 24 tokens, 2 PPO epochs).
- 135m: SmolLM2-135M-Instruct (models/ GGUF imported by the import_model kind, cached; or --model DIR) on the
  smollm2-r1-zero pipeline's reasoning-gym chain_sum prompts, with that pipeline's grpo params (LoRA r 16, 8 prompts
  x 4 samples x 64 tokens, temperature 0.7, no KL).

The held-out evaluator is off (it samples too, before the first and after the last iteration). Rounds interleave
the engines (hf, vllm, hf, vllm …); each round is a fresh stage (a fresh server). Seconds per iteration are the
intervals between the ends of consecutive iterations after the first (the server's start and the first iteration
are left out), reported as each round's median; `rollout` is the time inside the engine's `generate` (for vllm
including the weight push, also shown alone), `train` the rest of the iteration (rewards, log-prob forwards,
update). For vllm the server's CPU seconds are split into those inside `generate` and those while the trainer
works (what its idle threads take from the trainer), and the logged engine/trainer log-prob gaps are reported.

Then generation alone: `hf_generate` against the vllm engine on the same prompt ids (each task's GRPO batch), the
same new-token budget, temperature 1, interleaved rounds on one server started once (its start and one warm-up call
left out), each side timed once the server's worker has stopped spinning (`settle`); tokens/s counts the tokens
sampled (responses end at EOS).

Conditions recorded: the CPU, torch threads, the server's OMP threads, each round's 1-minute load average before it
and the CPU the machine's other processes used during it (all busy CPU from /proc/stat minus this process tree's).
Before measuring, the script waits (polling every 30 s, up to --quiet-wait seconds) until the 1-minute load average
is below --quiet-load, then measures anyway. --generation-only skips the GRPO rounds.

The server inherits this process's environment: `VLLM_ENABLE_V1_MULTIPROCESSING=0 … --server-args
'--distributed-executor-backend uni'` measures a server whose worker runs inside its API process (vLLM 0.32 on CPU
otherwise runs one worker process whose shared-memory queue reader spins for 1 s after every batch, which is
the server CPU seen while the trainer works).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.config import resolve  # noqa: E402
from stages.context import StageContext  # noqa: E402
from stages.data import load_rows  # noqa: E402
from stages.kinds import get_kind  # noqa: E402
from stages.models import load_policy, load_tokenizer  # noqa: E402
from stages.params import RolloutParams  # noqa: E402
from stages.processes import available_cores, torch_threads  # noqa: E402
from stages.rollout import HFEngine  # noqa: E402
from stages.spec import DataInput  # noqa: E402
from stages.text import encode_prompt, hf_generate  # noqa: E402
from stages.vllm_engine import VLLMEngine  # noqa: E402

TINY_PIPELINE, REAL_PIPELINE = "deepseek-r1-zero-vllm", "smollm2-r1-zero"
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINES = ("hf", "vllm")
TICK = os.sysconf("SC_CLK_TCK")


# --- the machine ------------------------------------------------------------------------------------------------


def load1() -> float:
    return os.getloadavg()[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def busy_cpu_s() -> float:
    """CPU seconds every core of the machine has been busy (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of process `root` and its live descendants (user + system, reaped children's included)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(entry.parent.name)] = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += sum(int(x) for x in stats[pid][11:15]) / TICK
        todo += children.get(pid, [])
    return total


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, float]:
    """Wait until the 1-minute load average is below `threshold` (at most `max_wait_s`); what was waited."""
    started = time.monotonic()
    while load1() >= threshold and time.monotonic() - started < max_wait_s:
        print(f"load average {load1():.2f} >= {threshold}: waiting", flush=True)
        time.sleep(poll_s)
    return {"waited_s": round(time.monotonic() - started), "load1_at_start": load1()}


class Window:
    """The CPU the machine's other processes use between `start()` and `stop()`: busy CPU minus this tree's."""

    def start(self) -> None:
        self.t, self.busy, self.ours = time.monotonic(), busy_cpu_s(), tree_cpu_s(os.getpid())

    def stop(self) -> float:
        elapsed = time.monotonic() - self.t
        return (busy_cpu_s() - self.busy - (tree_cpu_s(os.getpid()) - self.ours)) / elapsed


# --- what each task runs ----------------------------------------------------------------------------------------


class Tracker:
    """The stage tracker: keeps what is logged and the engine's tags, and marks each iteration's end."""

    def __init__(self, on_log: Callable[[], None]):
        self.on_log = on_log
        self.logged: list[dict[str, float]] = []
        self.tags: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, float], total: int | None = None, record: bool = True) -> None:
        self.logged.append(metrics)
        self.on_log()

    def tag(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def run_kind(kind_name: str, out: Path, inputs: dict[str, str], params: dict[str, Any],
             tracker: Tracker | None = None, before_close: Callable[[], None] | None = None) -> None:
    """Run a stage kind in this process, as `rl4llm stage` does (its opened engine closed however it ends)."""
    kind = get_kind(kind_name)
    ctx = StageContext("bench", kind_name, 0, kind.params(**params),
                       {name: DataInput(path=path) for name, path in inputs.items()},
                       {name: out / rel for name, rel in kind.outputs.items()}, out, None, Accelerator(cpu=True),
                       tracker or Tracker(lambda: None), declared=kind.inputs)
    try:
        kind.load_run()(ctx)
        if before_close:
            before_close()
    finally:
        ctx.close()


def stage_params(pipeline: str, stage: str) -> dict[str, Any]:
    return dict(resolve(REPO / "pipelines.yaml").stages[pipeline][stage].params)


def cached(cache: Path, name: str, params: dict[str, Any]) -> Path:
    """A cache folder for `name` built with `params` (another folder when they change)."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache / f"{name}-{key}"


def tiny_task(cache: Path, model: str | None) -> tuple[str, str]:
    """The deepseek-r1-zero-vllm pipeline's pretrained model (built by its data and pretrain stages unless given)
    and its RL prompts."""
    data_params, pretrain_params = stage_params(TINY_PIPELINE, "data"), stage_params(TINY_PIPELINE, "pretrain")
    data = cached(cache, "tiny-data", data_params)
    if not (data / "prompts.jsonl").exists():
        print(f"building the tiny task's data in {data}", flush=True)
        run_kind("synthetic_reasoning", data, {}, data_params)
    if model is None:
        built = cached(cache, "tiny-model", {**pretrain_params, "data": data.name})
        if not (built / "model" / "config.json").exists():
            print(f"pretraining the tiny model in {built}", flush=True)
            run_kind("pretrain", built, {"corpus": str(data / "pretrain.jsonl"),
                                         "vocab": str(data / "mixed_prompts.jsonl")}, pretrain_params)
        model = str(built / "model")
    return str(Path(model).resolve()), str((data / "prompts.jsonl").resolve())


def real_task(cache: Path, model: str | None) -> tuple[str, str]:
    """SmolLM2-135M-Instruct (the GGUF file imported by the import_model kind unless given) and the
    smollm2-r1-zero pipeline's chain_sum prompts."""
    data_params = stage_params(REAL_PIPELINE, "data")
    data = cached(cache, "chain-sum", data_params)
    if not (data / "prompts.jsonl").exists():
        run_kind("reasoning_gym", data, {}, data_params)
    if model is None:
        if not GGUF.exists():
            raise SystemExit(f"no {GGUF}: run `make model`, or pass --model DIR (a save_pretrained directory)")
        built = cached(cache, "smollm2-135m", {"gguf": str(GGUF.resolve()), **stage_params(REAL_PIPELINE, "import")})
        if not (built / "model" / "config.json").exists():
            print(f"importing {GGUF.name} into {built}", flush=True)
            run_kind("import_model", built, {"source": str(GGUF)}, stage_params(REAL_PIPELINE, "import"))
        model = str(built / "model")
    return str(Path(model).resolve()), str((data / "prompts.jsonl").resolve())


# --- GRPO seconds per iteration ---------------------------------------------------------------------------------


class Probe:
    """Seconds inside each engine's `generate` and, for vllm, the server's CPU seconds inside it and in total,
    marked at the end of every iteration."""

    def __init__(self):
        self.rollout_s = 0.0
        self.server_in = 0.0
        self.engine: VLLMEngine | None = None
        self.marks: list[dict[str, float]] = []

    def server_cpu(self) -> float:
        server = self.engine.server if self.engine else None
        return tree_cpu_s(server.process.pid) if server else 0.0

    def mark(self) -> None:
        self.marks.append({"t": time.monotonic(), "rollout": self.rollout_s, "server_in": self.server_in,
                           "server": self.server_cpu(), "push": self.engine.sync_s if self.engine else 0.0,
                           "busy": busy_cpu_s(), "ours": tree_cpu_s(os.getpid())})

    def timed(self, generate: Callable) -> Callable:
        def wrapper(engine, *args, **kwargs):
            if isinstance(engine, VLLMEngine):
                self.engine = engine
            started, cpu = time.monotonic(), self.server_cpu()
            try:
                return generate(engine, *args, **kwargs)
            finally:
                self.rollout_s += time.monotonic() - started
                if engine is self.engine and engine.server is not None:
                    self.server_in += self.server_cpu() - cpu if cpu else 0.0
        return wrapper

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = HFEngine.generate, VLLMEngine.generate
        HFEngine.generate, VLLMEngine.generate = self.timed(HFEngine.generate), self.timed(VLLMEngine.generate)
        try:
            yield
        finally:
            HFEngine.generate, VLLMEngine.generate = originals

    def iterations(self) -> list[dict[str, float]]:
        """Each iteration after the first: its seconds, rollout and push seconds, the server's CPU seconds while
        the trainer worked, and the cores the machine's other processes used."""
        rows = []
        for a, b in zip(self.marks, self.marks[1:]):
            seconds = b["t"] - a["t"]
            server = b["server"] - a["server"]
            rows.append({"s": seconds, "rollout": b["rollout"] - a["rollout"], "push": b["push"] - a["push"],
                         "server_cpu_in_rollout": b["server_in"] - a["server_in"],
                         "server_cpu_in_train": server - (b["server_in"] - a["server_in"]),
                         "others_cores": (b["busy"] - a["busy"] - (b["ours"] - a["ours"])) / seconds})
        return rows


def grpo_round(engine: str, model: str, prompts: str, params: dict[str, Any], iterations: int,
               server: dict[str, Any], out: Path) -> dict[str, Any]:
    """One fresh grpo stage on `engine`: its iterations after the first (`Probe.iterations`), their medians, the
    logged log-prob gaps and the engine's tags."""
    probe = Probe()
    tracker = Tracker(probe.mark)
    rollout = {"engine": engine, **server}
    params = {**params, "iterations": iterations, "evaluator": None, "rollout": rollout,
              "checkpoint_every": iterations + 1}
    load = load1()
    with probe.installed():
        run_kind("grpo", out, {"policy": model, "prompts": prompts}, params, tracker)
    rows = probe.iterations()
    gaps = [m for m in tracker.logged[1:] if "logprob_gap_mean" in m]
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"engine": engine, "load1_before": load, "iterations": rows, "median": median,
            "logprob_gap_mean": statistics.median(m["logprob_gap_mean"] for m in gaps) if gaps else None,
            "logprob_gap_max": max((m["logprob_gap_max"] for m in gaps), default=None),
            "tags": {k: v for k, v in tracker.tags.items() if k.startswith("rollout.")}}


# --- generation tokens/s ----------------------------------------------------------------------------------------


def settle(pid: int, max_s: float = 30.0) -> float:
    """Wait until the server's processes use under 5 % of a core (its worker spins for about a second after a
    batch: measured here, it would take a core from the hf side); the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        before = tree_cpu_s(pid)
        time.sleep(0.5)
        if tree_cpu_s(pid) - before < 0.025:
            break
    return time.monotonic() - started


def generation_rounds(model_dir: str, prompt_ids: list[list[int]], new_tokens: int, rounds: int,
                      server: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    """Tokens/s of `hf_generate` and of the vllm engine (one server, started and warmed up first) on the same
    prompt ids, temperature 1, interleaved rounds."""
    model, tokenizer = load_policy(model_dir).eval(), load_tokenizer(model_dir)
    engine = VLLMEngine(RolloutParams(engine="vllm", **server), 0, scratch / "scratch",
                        scratch / "vllm.log", REPO)
    results = []
    try:
        engine.generate(model, tokenizer, prompt_ids[:4], new_tokens, 1.0)  # start and warm up
        sides: dict[str, Callable[[], list[list[int]]]] = {
            "hf": lambda: hf_generate(model, tokenizer, prompt_ids, new_tokens, 1.0),
            "vllm": lambda: [g.response_ids for g in engine.generate(model, tokenizer, prompt_ids, new_tokens, 1.0)]}
        for round_ in range(rounds):
            for side, generate in sides.items():
                settled = settle(engine.server.process.pid)
                load, window = load1(), Window()
                server_before = tree_cpu_s(engine.server.process.pid)
                window.start()
                started = time.monotonic()
                rows = generate()
                seconds = time.monotonic() - started
                tokens = sum(map(len, rows))
                results.append({"round": round_ + 1, "engine": side, "tokens": tokens, "s": seconds,
                                "settled_s": settled, "tokens_per_s": tokens / seconds, "load1_before": load,
                                "others_cores": window.stop(), "vllm_version": engine.version,
                                "server_cpu_s": tree_cpu_s(engine.server.process.pid) - server_before})
                print(f"  generation round {round_ + 1} {side:<4} {tokens / seconds:7.1f} tokens/s ({tokens} tokens "
                      f"in {seconds:.1f} s; load {load:.2f})", flush=True)
    finally:
        engine.close()
    return results


# --- the report -------------------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], engine: str, key: str) -> float:
    return statistics.median(r["median"][key] for r in runs if r["engine"] == engine)


def report_grpo(task: str, grpo: list[dict[str, Any]]) -> None:
    print(f"\n### {task}: GRPO seconds per iteration (each round's median over its iterations after the first)\n")
    print("| round | engine | load before | s/iter | rollout | of which push | train | server CPU-s during train "
          "| others' cores | log-prob gap (median of means / max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(grpo):
        m = r["median"]
        gap = "" if r["logprob_gap_mean"] is None else f"{r['logprob_gap_mean']:.2e} / {r['logprob_gap_max']:.2e}"
        print(f"| {i // 2 + 1} | {r['engine']} | {r['load1_before']:.2f} | {m['s']:.2f} | {m['rollout']:.2f} | "
              f"{m['push']:.2f} | {m['s'] - m['rollout']:.2f} | {m['server_cpu_in_train']:.2f} | "
              f"{m['others_cores']:.2f} | {gap} |")
    hf, vllm = median_of(grpo, "hf", "s"), median_of(grpo, "vllm", "s")
    print(f"\nmedian of rounds: hf {hf:.2f} s, vllm {vllm:.2f} s, **vllm/hf {vllm / hf:.2f}x**")


def report_generation(task: str, generation: list[dict[str, Any]]) -> None:
    print(f"\n### {task}: generation alone\n")
    print("| round | engine | load before | tokens | s | tokens/s | others' cores | server CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in generation:
        print(f"| {r['round']} | {r['engine']} | {r['load1_before']:.2f} | {r['tokens']} | {r['s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['others_cores']:.2f} | {r['server_cpu_s']:.1f} |")
    rates = {e: statistics.median(r["tokens_per_s"] for r in generation if r["engine"] == e) for e in ENGINES}
    print(f"\nmedian tokens/s: hf {rates['hf']:.1f}, vllm {rates['vllm']:.1f}, "
          f"**vllm/hf {rates['vllm'] / rates['hf']:.2f}x**")


def server_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout params of a started server the command line sets (threads, more server arguments)."""
    return {"threads": args.server_threads, "server_args": shlex.split(args.server_args)}


def run_task(task: str, model: str, prompts: str, params: dict[str, Any], args: argparse.Namespace,
             scratch: Path) -> dict[str, Any]:
    print(f"\n{task}: {model}, {params['prompts_per_step']} prompts x {params['samples_per_prompt']} samples x "
          f"{params['max_new_tokens']} new tokens, {args.iterations} iterations per round", flush=True)
    grpo = []
    for round_ in range(0 if args.generation_only else args.rounds):
        for engine in ENGINES:
            result = grpo_round(engine, model, prompts, params, args.iterations, server_settings(args),
                                scratch / f"{task}-{engine}-{round_}")
            grpo.append(result)
            print(f"  grpo round {round_ + 1} {engine:<4} {result['median']['s']:6.2f} s/iteration (rollout "
                  f"{result['median']['rollout']:.2f}, push {result['median']['push']:.2f}); load before "
                  f"{result['load1_before']:.2f}", flush=True)
    tokenizer = load_tokenizer(model)
    rows = load_rows(DataInput(path=prompts))[:params["prompts_per_step"]]
    prompt_ids = [encode_prompt(tokenizer, r["prompt"]) for r in rows for _ in range(params["samples_per_prompt"])]
    generation = generation_rounds(model, prompt_ids, params["max_new_tokens"], args.rounds, server_settings(args),
                                   scratch / f"{task}-generation")
    if grpo:
        report_grpo(task, grpo)
    report_generation(task, generation)
    return {"model": model, "params": {k: params[k] for k in ("prompts_per_step", "samples_per_prompt",
                                                               "max_new_tokens", "ppo_epochs", "lora", "temperature")},
            "grpo": grpo, "generation": generation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-model", help="the tiny task's model (default: built from deepseek-r1-zero-vllm)")
    parser.add_argument("--model", help="SmolLM2-135M-Instruct as a save_pretrained directory (default: imported "
                                        "from models/ by import_model)")
    parser.add_argument("--only", choices=("tiny", "135m"), help="run one task only")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine")
    parser.add_argument("--iterations", type=int, default=4, help="per GRPO round; the first one is not timed")
    parser.add_argument("--tiny-iterations", type=int, help="per GRPO round on the tiny task (default: 3x that)")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("PROMPTS", "SAMPLES", "TOKENS"),
                        help="the 135m task's batch (default: the smollm2 pipeline's, 8 4 64)")
    parser.add_argument("--generation-only", action="store_true", help="measure generation tokens/s only")
    parser.add_argument("--threads", type=int, default=torch_threads(1), help="torch threads of the trainer")
    parser.add_argument("--server-threads", type=int, help="the server's OMP threads (default: every core)")
    parser.add_argument("--server-args", default="", help="more arguments for the server (rollout.server_args), "
                        "one string, e.g. '--distributed-executor-backend uni'")
    parser.add_argument("--quiet-load", type=float, default=0.7, help="wait for a 1-minute load average below it")
    parser.add_argument("--quiet-wait", type=float, default=1200, help="wait at most this many seconds for it")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rl4llm" / "bench-vllm"),
                        help="where the tiny model, the imported 135M model and the prompts are kept")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache).resolve()
    tasks: dict[str, Callable[[], tuple[str, str, dict[str, Any]]]] = {
        "tiny": lambda: (*tiny_task(cache, args.tiny_model), stage_params(TINY_PIPELINE, "grpo_vllm")),
        "135m": lambda: (*real_task(cache, args.model), stage_params(REAL_PIPELINE, "grpo"))}
    prepared = {name: build() for name, build in tasks.items() if args.only in (None, name)}
    if args.batch and "135m" in prepared:
        prepared["135m"][2].update(zip(("prompts_per_step", "samples_per_prompt", "max_new_tokens"), args.batch))
    quiet = wait_for_quiet(args.quiet_load, args.quiet_wait)
    conditions = {"cpu": cpu_model(), "cores": available_cores(), "torch_threads": torch.get_num_threads(),
                  "server_omp_threads": args.server_threads or available_cores(), "server_args": args.server_args,
                  "torch": torch.__version__,
                  **quiet}
    print(json.dumps(conditions), flush=True)
    results: dict[str, Any] = {"conditions": conditions, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="rl4llm-bench-vllm-") as tmp:
        os.chdir(tmp)  # the stages' scratch (.rl4llm/: a started server's weights and log) goes here
        for task, (model, prompts, params) in prepared.items():
            iterations = args.iterations if task == "135m" else args.tiny_iterations or 3 * args.iterations
            results[task] = run_task(task, model, prompts, params,
                                     argparse.Namespace(**{**vars(args), "iterations": iterations}), Path(tmp))
    results["conditions"]["vllm"] = next(r["vllm_version"] for t in prepared for r in results[t]["generation"])
    print(f"\nconditions: {json.dumps(results['conditions'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
