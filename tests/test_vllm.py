"""The vllm rollout engine against real vLLM servers (CPU build, its own environment: `make vllm`; `make test-vllm`
runs these). Skipped, saying why, where that environment is absent."""

from __future__ import annotations

import copy
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from stages import instruct_task, reasoning_task, vllm_engine
from stages.data import write_jsonl
from stages.models import load_policy, load_tokenizer
from stages.multiturn import Rollout, multi_turn_sample
from stages.params import RolloutParams
from stages.spec import DataInput
from stages.text import response_logprobs, sample
from stages.tools import ToolBox
from stages.vllm_engine import VLLMEngine, VLLMServer, vllm_python
from tests import test_multiturn as multiturn_test
from tests.conftest import REPO, make_project, session_processes
from tests.test_grpo import run_grpo
from tests.test_r1_kinds import tiny_model

try:
    vllm_python(REPO)
    MISSING = None
except ValueError as e:
    MISSING = str(e)
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(MISSING is not None, reason=f"no vLLM environment: {MISSING}")]

LOGPROB_TOLERANCE = 1e-4  # |log π_trainer − log π_vllm| per token, fp32, tiny model; measured here: max 3e-5 (135M: 1e-4)
BLOCK = 32  # KV-cache block size of the test server: prompts longer than it share cached blocks
# ~40 tokens: more than one cache block, so a second sample of it reuses the first block's cached keys and values
LONG_PROMPT = " ".join(instruct_task.ALL_WORDS[:36])
PROMPTS = [LONG_PROMPT, "name two colors", LONG_PROMPT, "name three animals"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny Llama with 2 heads of size 32 (vLLM's CPU attention has no kernel below 32)."""
    words = [*instruct_task.ALL_WORDS, *instruct_task.TOPICS, *instruct_task.COUNTS, "name"]
    return tiny_model([" ".join(words)], tmp_path_factory.mktemp("vllm_policy"), hidden=64)


def new_engine(root: Path, **rollout) -> VLLMEngine:
    return VLLMEngine(RolloutParams(engine="vllm", **rollout), 0, root / "scratch", root / "vllm.log", REPO)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[VLLMEngine]:
    started = new_engine(tmp_path_factory.mktemp("vllm_engine"), server_args=["--block-size", str(BLOCK)])
    yield started
    started.close()


def gap(model: torch.nn.Module, samples, temperature: float = 1.0) -> float:
    """The largest |trainer − engine| log-prob over the sampled response tokens."""
    with torch.no_grad():
        trainer = response_logprobs(model.eval(), samples.batch, temperature)
    return ((trainer - samples.engine_logprobs).abs() * samples.batch.response_mask).max().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_agree_with_the_trainers(engine, policy_dir, temperature):
    model, tokenizer = load_policy(str(policy_dir)), load_tokenizer(str(policy_dir))
    samples = sample(model, tokenizer, PROMPTS * 4, 12, temperature, engine=engine, logprobs=True)
    assert samples.batch.response_mask.sum() > 16 * 4
    assert gap(model, samples, temperature) < LOGPROB_TOLERANCE


def test_responses_end_at_eos_or_at_max_new_tokens(engine, policy_dir):
    model, tokenizer = load_policy(str(policy_dir)), load_tokenizer(str(policy_dir))
    samples = sample(model, tokenizer, PROMPTS * 8, 6, 1.0, engine=engine)
    rows = [ids[:n] for ids, n in zip(samples.batch.response_ids.tolist(), samples.lengths)]
    assert all(len(r) == 6 or r[-1] == tokenizer.eos_token_id for r in rows)
    assert all(tokenizer.eos_token_id not in r[:-1] for r in rows)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The model after an 'optimiser step' that changes its outputs a lot (in place, as an optimiser does)."""
    stepped = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stepped.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return stepped


def sample_after_update(engine: VLLMEngine, policy_dir: Path, seed: int) -> float:
    """Sample the long prompts (caching their first block), update the policy (a step drawn from `seed`: each test
    its own, so no cached block of an earlier test holds the same weights), sample again: the gap between the
    engine's and the updated trainer's log-probs."""
    model, tokenizer = load_policy(str(policy_dir)), load_tokenizer(str(policy_dir))
    sample(model, tokenizer, [LONG_PROMPT] * 4, 4, 1.0, engine=engine)
    model = perturbed(model, seed)
    return gap(model, sample(model, tokenizer, [LONG_PROMPT] * 8, 8, 1.0, engine=engine, logprobs=True))


def test_after_a_weight_push_the_engine_samples_from_the_new_weights(engine, policy_dir):
    pushes = engine.pushes
    assert sample_after_update(engine, policy_dir, seed=1) < LOGPROB_TOLERANCE
    assert engine.pushes == pushes + 2  # the other model, then its update


def test_without_the_prefix_cache_reset_the_engine_samples_from_stale_weights(engine, policy_dir, monkeypatch):
    """The reset is what makes the test above pass: skipped, the cached first block of the prompt still holds the
    old weights' keys and values."""
    real = vllm_engine.call
    monkeypatch.setattr(vllm_engine, "call", lambda url, path, *a, **k:
                        None if path == "/reset_prefix_cache" else real(url, path, *a, **k))
    assert sample_after_update(engine, policy_dir, seed=2) > 0.1


def test_the_same_seed_gives_the_same_samples(engine, policy_dir):
    model, tokenizer = load_policy(str(policy_dir)), load_tokenizer(str(policy_dir))

    def draw(seed: int) -> list[str]:
        torch.manual_seed(seed)
        return sample(model, tokenizer, PROMPTS * 4, 12, 1.0, engine=engine).completions

    first = draw(0)
    assert draw(0) == first
    assert draw(1) != first
    assert len(set(first[0::4])) > 1  # the copies of one prompt get samples of their own


def served_requests(url: str) -> float:
    """How many requests a server finished (its Prometheus counter)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(float(value) for value in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", text, re.M))


def test_two_servers_serve_one_stage_with_the_samples_one_server_gives(engine, policy_dir, tmp_path):
    model, tokenizer = load_policy(str(policy_dir)), load_tokenizer(str(policy_dir))
    torch.manual_seed(5)
    alone = sample(model, tokenizer, PROMPTS * 4, 12, 1.0, engine=engine).completions
    second = VLLMServer(engine.scratch / "model", RolloutParams(engine="vllm"), 0, 64, tmp_path / "second.log", REPO)
    try:
        urls = [engine.urls[0], second.url]
        served = [served_requests(url) for url in urls]
        spread = new_engine(tmp_path, url=urls)
        torch.manual_seed(5)
        assert sample(model, tokenizer, PROMPTS * 4, 12, 1.0, engine=spread).completions == alone
        assert [served_requests(url) - before for url, before in zip(urls, served)] == [8, 8]
        spread.close()
    finally:
        second.stop()


def run_config(root: Path, policy: Path, iterations: int) -> None:
    make_project(root)
    grpo = {"rewards": {"accuracy": 1.0, "format": 0.5}, "iterations": iterations, "prompts_per_step": 4,
            "samples_per_prompt": 4, "max_new_tokens": 8, "micro_batch_size": 64, "rollout": {"engine": "vllm"}}
    config = {"pipelines": {"served": {"defaults": {"seed": 0}, "stages": [
        {"name": "data", "kind": "synthetic_reasoning",
         "params": {"pretrain_documents": 10, "general_documents": 2, "rl_prompts": 16, "eval_prompts": 4,
                    "general_prompts": 2}},
        {"name": "grpo", "kind": "grpo", "inputs": {"policy": str(policy), "prompts": "data.prompts"},
         "params": grpo}]}}}
    (root / "pipelines.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def guards_of(root: Path) -> list[int]:
    """The pids of the guards running a vLLM server on a model under `root`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stages.guard" in args and any(str(root).encode() in a for a in args):
            found.append(int(cmdline.parent.name))
    return found


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.e2e
def test_the_server_is_gone_after_a_sigkill_of_rl4llm_run(policy_dir, tmp_path):
    run_config(tmp_path, policy_dir, iterations=10_000)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "served"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, guards, port = time.monotonic() + 300, [], None
        while time.monotonic() < deadline and not (port and healthy(port)):
            guards = guards_of(tmp_path)
            if guards:
                port = int(re.search(r"--port\0(\d+)", Path(f"/proc/{guards[0]}/cmdline").read_text()).group(1))
            assert run.poll() is None, run.stdout.read()
            time.sleep(1)
        assert port and healthy(port), "no vLLM server started"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 120
        while session_processes(guards[0]) and time.monotonic() < deadline:
            time.sleep(1)
        assert session_processes(guards[0]) == set(), "processes of the vLLM server outlived the run"
        with socket.socket() as s:  # nothing listens on the port any more (its closed connections may linger)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for pid in guards_of(tmp_path):
            os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def reasoning_inputs(tmp_path_factory) -> dict[str, DataInput]:
    """A random tiny policy (head size 32) whose vocabulary is the reasoning task's Latin and Greek words, and its
    RL prompts: as tests/test_grpo.py's, for vLLM."""
    root = tmp_path_factory.mktemp("vllm_grpo")
    rng = random.Random(0)
    rows = [{k: v for k, v in reasoning_task.make_problem(rng, language).items() if k != "steps"}
            for language in reasoning_task.LANGUAGES for _ in range(16)]
    tiny_model([r["prompt"] for r in rows] + [" ".join(reasoning_task.TAGS)], root / "policy", hidden=64)
    write_jsonl(rows, root / "prompts.jsonl")
    return {"policy": DataInput(path=str(root / "policy")), "prompts": DataInput(path=str(root / "prompts.jsonl"))}


def test_grpo_with_vllm_learns_as_with_hf(reasoning_inputs, tmp_path):
    """The R1 task's language-consistency reward from a random policy (it writes Latin and Greek alike): GRPO raises
    it through either engine, by amounts within each other's reach, and through vllm the trainer and the engine agree
    on every sampled token's log-prob."""
    params = dict(rewards={"language_consistency": 1.0}, iterations=10, prompts_per_step=8, samples_per_prompt=8,
                  max_new_tokens=6, lr=3e-3, kl_coef=0.0, ppo_epochs=2, micro_batch_size=64)
    rewards = {}
    for engine in ("hf", "vllm"):
        logged = run_grpo(reasoning_inputs, tmp_path / engine, rollout={"engine": engine}, **params).logged
        rewards[engine] = [m["reward"] for m in logged]
        if engine == "vllm":
            assert max(m["logprob_gap_max"] for m in logged) < LOGPROB_TOLERANCE
    gains = {engine: sum(r[-3:]) / 3 - sum(r[:3]) / 3 for engine, r in rewards.items()}
    assert min(gains.values()) > 0.1, rewards
    assert abs(gains["hf"] - gains["vllm"]) < 0.15, rewards


def test_multi_turn_rollouts_call_tools_through_vllm_and_repeat_with_a_seed(tmp_path):
    policy = tiny_model([multiturn_test.ROW["prompt"], *multiturn_test.WORDS], tmp_path / "policy", hidden=64)
    model, tokenizer = load_policy(str(policy)), load_tokenizer(str(policy))
    toolbox = ToolBox({"search": multiturn_test.lookup})
    answer = tokenizer(" <information> quenta is the capital </information> ", add_special_tokens=False)["input_ids"]
    engine = new_engine(tmp_path)
    try:
        def roll(seed: int) -> list[Rollout]:
            torch.manual_seed(seed)
            return multi_turn_sample(model, tokenizer, [multiturn_test.ROW["prompt"]] * 32, [multiturn_test.ROW] * 32,
                                     toolbox, 2, 24, engine=engine).rollouts

        first = roll(0)
        assert roll(0) == first and roll(1) != first
        called = [r for r in first if r.tool_calls and not r.invalid_calls]
        assert called  # the random policy closes calls by chance: the rollouts went multi-turn through vLLM
        for r in called:  # the tokens the policy did not write are the tool's answers (the last one maybe cut)
            appended = [t for t, written in zip(r.response_ids, r.loss_mask) if not written]
            assert appended and appended == (answer * r.tool_calls)[:len(appended)]
    finally:
        engine.close()
