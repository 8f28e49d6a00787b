"""The `vllm` rollout engine: vLLM's OpenAI-compatible servers, fed token ids, synced with the policy's weights.

A stage either starts its own server (`VLLMServer`: vLLM's own environment, `make vllm`, so that vLLM's pins never
touch the project's; 127.0.0.1, a free port, the policy's current weights) or reaches servers a team runs
(`rollout.url`, one or several: each request's prompts are spread over them). Every server must run with
`VLLM_SERVER_DEV_MODE=1` (weight reload and cache reset are dev endpoints) and `--logprobs-mode processed_logprobs`
(log-probs of softmax(logits / T), the distribution that sampled).

Before it samples, the engine makes the servers hold the policy's weights: when the policy changed since the last
push (an optimiser step bumps its parameters' version counters) it writes the tensors training changes (with LoRA,
the adapted layers' merged weights; else every trainable parameter) to a safetensors file and asks each server to
`reload_weights` from it, then to `reset_prefix_cache` — mandatory: cached KV blocks of the old weights would be
reused for shared prompt prefixes (log-probs off by up to 5.6 nats measured here). The file must be readable by the
servers: a team's servers on other machines need `rollout.weights_dir` on a shared filesystem.

Each sample is its own request with its own seed, drawn from the stage's torch RNG: an engine-wide seed alone
makes samples depend on how the server happens to batch concurrent requests (measured here: the first request's
samples repeat across fresh servers, the next ones do not). On CPU (vLLM 0.32), as measured: `load_weights` fails
and `reload_weights` works; head sizes below 32 have no CPU attention kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.params import RolloutParams
from stages.processes import available_cores, die_with_parent, terminate
from stages.progress import Progress
from stages.text import Generation

VLLM_PYTHON_ENV = "RL4LLM_VLLM_PYTHON"  # the interpreter of vLLM's environment (default: .venv-vllm/bin/python)
VLLM_ENV_DIR = ".venv-vllm"  # where `make vllm` builds that environment, in the project root
SERVED_NAME = "policy"  # the model name a started server answers to
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels
REQUEST_TIMEOUT_S = 3600.0
CONCURRENT_REQUESTS = 64  # requests in flight per stage process (the servers batch them)


CHECKOUT = Path(__file__).resolve().parents[1]  # the rl4llm checkout, where `make vllm` builds VLLM_ENV_DIR


def vllm_python(root: Path) -> Path:
    """vLLM's interpreter: RL4LLM_VLLM_PYTHON, else VLLM_ENV_DIR in the project `root`, else in this checkout; a
    ValueError saying how to get one when there is none."""
    if os.environ.get(VLLM_PYTHON_ENV):
        candidates = [Path(os.environ[VLLM_PYTHON_ENV])]
    else:
        candidates = [folder / VLLM_ENV_DIR / "bin" / "python" for folder in (root, CHECKOUT)]
    python = next((c for c in candidates if c.exists()), None)
    if python is None:
        raise ValueError(f"rollout engine vllm: no vLLM environment at {candidates[0]}: run `make vllm` (it builds "
                         f"{VLLM_ENV_DIR}/), set {VLLM_PYTHON_ENV} to an interpreter that has vLLM, or give "
                         "rollout.url of servers that run")
    return python


def call(url: str, path: str, body: dict[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """GET (no body) or POST JSON to a server; its JSON answer. An HTTP error raises naming the server and its
    message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"vLLM server {url}{path} answered {e.code}: {e.read().decode(errors='replace')[:500]}"
                           ) from None
    return json.loads(text) if text else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_head_size(model: PreTrainedModel) -> None:
    """On CPU, refuse a model whose attention head size vLLM has no kernel for (at start, not at the first sample)."""
    config = model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not torch.cuda.is_available() and head not in CPU_HEAD_SIZES:
        raise ValueError(f"rollout engine vllm: the model's attention head size is {head}; vLLM on CPU supports "
                         f"{', '.join(map(str, CPU_HEAD_SIZES))} (a tiny model: fewer heads, e.g. pretrain heads: 2)")


class VLLMServer:
    """A vLLM server this stage owns: started on a model directory, gone when `stop` is called or the stage dies
    (run under `stages.guard`, which takes vLLM's own processes with it)."""

    def __init__(self, model_dir: Path, rollout: RolloutParams, seed: int, context: int | None, log: Path,
                 root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        gpu = torch.cuda.is_available()
        cmd = [str(vllm_python(root)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--seed", str(seed), "--generation-config", "vllm", "--logprobs-mode", "processed_logprobs",
               "--uvicorn-log-level", "warning"]
        cmd += ["--max-model-len", str(context)] if context else []
        # on CPU the worker runs inside the engine process (`uni`, no multiprocessing): vLLM 0.32's worker process
        # busy-waits 1 s after every batch, about 1 CPU-second per iteration taken from the trainer (measured)
        cmd += ["--gpu-memory-utilization", str(rollout.gpu_memory_utilization)] if gpu else \
            ["--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni"]
        cmd += rollout.server_args  # last: they override the above
        threads = str(rollout.threads or available_cores())
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": f"{rollout.kv_cache_gib:g}",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": threads,
               **({} if gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "stages.guard", *cmd], stdout=out,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                            preexec_fn=die_with_parent)
        self.wait_healthy(rollout.startup_timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.process.returncode}) while starting: "
                                   f"{self.tail()} (its log: {self.log})")
            try:
                call(self.url, "/health", timeout=5)
                return
            except (OSError, RuntimeError, json.JSONDecodeError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer /health within {timeout_s:g} s (its log: {self.log})")

    def tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process, grace_s=30.0)


def _hf_name(name: str) -> str:
    """A PEFT model's parameter name as the plain model's checkpoint has it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@torch.no_grad()
def policy_weights(model: torch.nn.Module, changed_only: bool) -> dict[str, torch.Tensor]:
    """The policy's weights under checkpoint names, LoRA adapters merged in (copies, contiguous): every weight, or
    with `changed_only` those training changes (the adapted layers' weights; without LoRA, trainable parameters)."""
    lora = hasattr(model, "merge_adapter")
    if lora:
        model.merge_adapter()
    try:
        inner = model.get_base_model() if lora else model
        state = {_hf_name(k): v for k, v in inner.state_dict().items() if "lora_" not in k}
        if changed_only:
            keep = ({_hf_name(f"{name}.weight") for name, module in inner.named_modules() if hasattr(module,
                                                                                                    "base_layer")}
                    if lora else {_hf_name(name) for name, p in model.named_parameters() if p.requires_grad})
            # tied input and output embeddings go as both names: vLLM's reload unties them otherwise (measured:
            # pushing the embeddings alone left the output layer stale, log-probs off by 43 nats)
            embeddings = inner.get_input_embeddings().weight
            tied = {_hf_name(n) for n, p in inner.named_parameters(remove_duplicate=False) if p is embeddings}
            state = {k: v for k, v in state.items() if k in keep or (k in tied and keep & tied)}
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    finally:
        if lora:
            model.unmerge_adapter()


def fingerprint(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter is replaced or updated in place (tensor version counters)."""
    return tuple((id(p), p._version) for p in model.parameters())


class VLLMEngine:
    """`RolloutEngine` over vLLM servers (started by the stage on the first sample, or at `rollout.url`)."""

    name = "vllm"

    def __init__(self, rollout: RolloutParams, seed: int, scratch: Path, log: Path, root: Path,
                 is_main: bool = True, share: Callable[[Any], Any] | None = None,
                 report: Callable[[dict[str, str]], None] | None = None):
        self.rollout, self.seed, self.scratch, self.log, self.root = rollout, seed, scratch, log, root
        self.report = report  # receives `describe()` when the engine closes (the stage's MLflow tags)
        self.is_main = is_main
        self.share = share or (lambda value: value)  # the main process's `value`, on every process (a barrier)
        urls = rollout.url
        self.urls: list[str] = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls or [])]
        self.server: VLLMServer | None = None
        self.model_name: str | None = None  # what the servers serve, once started
        self.version = ""  # vLLM's version, once started
        self.synced: tuple | None = None
        self.pushes = 0
        self.sync_s = 0.0  # seconds spent pushing weights, over the stage

    @property
    def weights_dir(self) -> Path:
        return Path(self.rollout.weights_dir) if self.rollout.weights_dir else self.scratch / "weights"

    def start(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Start a server on the policy's current weights (none given), or push them to the given ones."""
        inner = getattr(model, "module", model)
        if self.urls:
            self.push(inner, changed_only=False)
        else:
            check_head_size(inner)
            if self.is_main:
                self.launch(inner, tokenizer)
            self.urls = self.share(self.urls)
            self.synced = fingerprint(inner)
        self.model_name = call(self.urls[0], "/v1/models", timeout=30)["data"][0]["id"]
        self.version = call(self.urls[0], "/version", timeout=30)["version"]

    def launch(self, inner: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Save the policy's full weights with its config and tokenizer, and start a server on them."""
        model_dir = self.scratch / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        config = (inner.get_base_model() if hasattr(inner, "get_base_model") else inner).config
        config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        save_file(policy_weights(inner, changed_only=False), model_dir / "model.safetensors")
        self.server = VLLMServer(model_dir, self.rollout, self.seed,
                                 getattr(config, "max_position_embeddings", None), self.log, self.root)
        self.urls = [self.server.url]

    def push(self, model: torch.nn.Module, changed_only: bool = True) -> None:
        """Write the policy's (changed) weights where the servers read them, `reload_weights` on each, then reset
        each one's prefix cache. Only the main process writes and calls; every process waits for it."""
        started = time.monotonic()
        if self.is_main:
            folder = self.weights_dir / f"push-{self.pushes}"
            folder.mkdir(parents=True, exist_ok=True)
            save_file(policy_weights(model, changed_only), folder / "model.safetensors")
            for url in self.urls:
                call(url, "/collective_rpc", {"method": "reload_weights",
                                              "kwargs": {"weights_path": str(folder.resolve())}})
                call(url, "/reset_prefix_cache", {})
            shutil.rmtree(folder)
        self.share(None)
        self.pushes += 1
        self.synced = fingerprint(model)
        self.sync_s += time.monotonic() - started

    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                 max_new_tokens: int, temperature: float, logprobs: bool = False, what: str = "sampling"
                 ) -> list[Generation]:
        inner = getattr(model, "module", model)
        if self.model_name is None:
            self.start(inner, tokenizer)
        elif fingerprint(inner) != self.synced:
            self.push(inner)
        # one request per sample, seeded from the stage's torch RNG (as `generate` draws from it): the samples do
        # not depend on how the server batches concurrent requests, and a resumed stage draws the same seeds
        seeds = torch.randint(2**31 - 1, (len(prompt_ids),)).tolist()
        # contiguous shares of the servers, so the samples of one prompt meet in one server's prefix cache
        servers = [self.urls[i * len(self.urls) // len(prompt_ids)] for i in range(len(prompt_ids))]
        with Progress(what, len(prompt_ids)) as progress, ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            def complete(i: int) -> Generation:
                generation = self.complete(servers[i], prompt_ids[i], seeds[i], max_new_tokens, temperature,
                                           logprobs, tokenizer.eos_token_id)
                progress.advance(1, tokens=len(generation.response_ids))
                return generation

            return list(pool.map(complete, range(len(prompt_ids))))

    def complete(self, url: str, prompt: list[int], seed: int, max_new_tokens: int, temperature: float,
                 logprobs: bool, eos: int) -> Generation:
        """One completions request: a token-id prompt, a seed, the sampling settings of `sample`."""
        body = {"model": self.model_name, "prompt": prompt, "seed": seed, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                "stop_token_ids": [eos], "return_token_ids": True, "skip_special_tokens": False}
        if logprobs:
            body["logprobs"] = 0
        choice = call(url, "/v1/completions", body)["choices"][0]
        return Generation(choice["token_ids"], choice["logprobs"]["token_logprobs"] if logprobs else None)

    def describe(self) -> dict[str, str]:
        return {"rollout.engine": "vllm", "rollout.engine_version": self.version,
                "rollout.servers": ",".join(self.urls), "rollout.weight_pushes": str(self.pushes),
                "rollout.weight_push_s": f"{self.sync_s:.1f}"}

    def close(self) -> None:
        if self.report:
            self.report(self.describe())
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)
