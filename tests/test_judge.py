"""LLM-as-judge reward: the score parser, the template filling, a tiny pipeline model as the judge, and a served
judge on 127.0.0.1 that answers, answers badly, errs or is too slow."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from stages.data import write_jsonl
from stages.judge import JudgeParams, JudgeReward, judge_question, parse_score, served_judge
from stages.models import load_policy, load_tokenizer, save
from stages.runs import grpo
from tests.test_r1_kinds import run_kind, tiny_model


@pytest.mark.parametrize("reply, score", [
    ("7", 7.0),
    ("Score: 7/10", 7.0),  # the first number after the marker; "/10" is never read
    ("score : 10", 10.0),  # the top of the scale; any case, spaces before the colon
    ("0", 0.0),
    ("The answer has 3 steps. Score: 9", 9.0),  # after the marker, not the first number of the reply
    ("Score: 11", None),  # above max_score
    ("Score: 11 or 5", None),  # later numbers are never tried
    ("Score: -3", None),  # negative
    ("7.5", None),  # not a whole number
    ("7.0", 7.0),
    ("no number here", None),
    ("", None),
    ("1234567", None),  # more than MAX_DIGITS digits
    ("x7", None),  # glued to a word: not a number
    ("٧", None),  # only ASCII digits
    ("a" * 1000 + " 5", None),  # beyond MAX_REPLY_CHARS
])
def test_parse_score(reply, score):
    assert parse_score(reply, 10) == score


def test_the_template_is_filled_once_and_never_re_scanned():
    template = "Q: {prompt} | A: {completion} | out of {max_score} | {other}"
    question = judge_question(template, "what is {completion}?", "it is {prompt} {max_score} {{x}}", 5, 100)
    assert question == "Q: what is {completion}? | A: it is {prompt} {max_score} {{x}} | out of 5 | {other}"
    assert judge_question("{completion}", "q", "abcdef", 10, 4) == "abcd"  # cut to max_completion_chars


def test_judge_reward_is_score_over_max_score_and_counts_unparsed():
    asked = []

    def ask(questions: list[str]) -> list[str | None]:
        asked.extend(questions)
        return ["Score: 7", "I cannot say", None, "Score: 4"]

    reward = JudgeReward(ask, JudgeParams(template="{prompt}: {completion}", max_score=8))
    values = reward(["c1", "c2", "c3", "c4"], prompt=["p1", [{"role": "user", "content": "p2"}], "p3", "p4"])
    assert values == [7 / 8, 0.0, 0.0, 0.5]
    assert asked == ["p1: c1", "p2: c2", "p3: c3", "p4: c4"]  # a chat prompt's user turn
    assert (reward.take_unparsed(), reward.take_unparsed()) == (2, 0)


def test_judge_params_are_checked():
    with pytest.raises(ValidationError, match=r"must contain \{completion\}"):
        JudgeParams(template="Rate {prompt}")
    with pytest.raises(ValidationError, match="must start with http"):
        JudgeParams(url="127.0.0.1:8000")
    with pytest.raises(ValidationError, match="judge params are set but 'judge' is not in rewards"):
        grpo.Params(judge={"max_score": 5})
    with pytest.raises(ValidationError, match="unknown reward 'jugde'.*or 'reward_model'.*'judge'"):
        grpo.Params(rewards={"jugde": 1.0})
    assert grpo.Params(rewards={"judge": 1.0}, judge={"url": "http://127.0.0.1:1"}).judge.timeout_s == 30.0
    for params in ({}, {"rewards": {"judge": 1.0}, "judge": {"max_score": 5}}):  # a resolved spec (params.yaml:
        resolved = grpo.Params(**params).model_dump(mode="json")  # every default written out) reads back
        assert grpo.Params(**resolved).model_dump(mode="json") == resolved


# --- a pipeline model as the judge ------------------------------------------------------------------------------


def digit_judge(out: Path) -> Path:
    """A random tiny LM over the digits whose output layer gives every other token the logit 0: its greedy reply is
    digits whenever some digit's logit is positive, and can be empty (an EOS first) otherwise."""
    tiny_model([" ".join(map(str, range(10)))], out)
    model, tokenizer = load_policy(str(out)), load_tokenizer(str(out))
    with torch.no_grad():
        model.get_output_embeddings().weight[:tokenizer.convert_tokens_to_ids("0")] = 0.0  # specials come first
    save(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> dict[str, str]:
    """A tiny judge that speaks digits, a tiny policy and prompts."""
    root = tmp_path_factory.mktemp("judge")
    write_jsonl([{"prompt": f"q {w}"} for w in "abcd"], root / "prompts.jsonl")
    return {"judge": str(digit_judge(root / "judge")), "policy": str(tiny_model(["a b c d q"], root / "policy")),
            "prompts": str(root / "prompts.jsonl")}


def test_a_tiny_pipeline_judge_scores_in_0_1_deterministically(judged):
    p = grpo.Params(rewards={"judge": 1.0}, judge={"template": "Score: {prompt} {completion}", "max_new_tokens": 2})
    ask, replies = grpo.model_judge(judged["judge"], torch.device("cpu"), p), []
    reward = JudgeReward(lambda questions: replies.extend(ask(questions)) or replies[-len(questions):], p.judge)
    # questions that end differently, so that the judge's replies differ
    completions, prompts = [" ".join(str((7 * i + 3 * k) % 10) for k in range(3)) for i in range(8)], ["1"] * 8
    first, second = reward(completions, prompt=prompts), reward(completions, prompt=prompts)
    assert first == second  # greedy
    assert all(0 <= v <= 1 and round(v * 10, 6) == int(round(v * 10, 6)) for v in first)
    assert all(len(reply.split()) <= 2 for reply in replies)  # max_new_tokens
    parsed = [parse_score(reply, 10) for reply in replies[:8]]
    assert first == [0.0 if score is None else score / 10 for score in parsed] and len(set(first)) > 1
    assert reward.take_unparsed() == 2 * parsed.count(None)


def test_grpo_with_a_pipeline_judge_logs_its_reward_and_unparsed(judged, tmp_path):
    inputs = {k: judged[k] for k in ("policy", "prompts", "judge")}
    _, tracker = run_kind("grpo", tmp_path, inputs, rewards={"judge": 1.0}, judge={"max_new_tokens": 2},
                          iterations=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, kl_coef=0.0)
    logged = tracker.logged[-1]
    assert 0 <= logged["reward_judge"] <= 1 and 0 <= logged["judge_unparsed"] <= 4


@pytest.mark.parametrize("params, inputs, message", [
    ({"rewards": {"judge": 1.0}}, ("policy", "prompts"), "the 'judge' reward and a judge"),
    ({"rewards": {"format": 1.0}}, ("policy", "prompts", "judge"), "the 'judge' reward and a judge"),
    ({"rewards": {"judge": 1.0}, "judge": {"url": "http://127.0.0.1:1"}}, ("policy", "prompts", "judge"),
     "two judges: give one"),
])
def test_the_judge_reward_needs_one_judge(judged, tmp_path, params, inputs, message):
    with pytest.raises(ValueError, match=message):
        run_kind("grpo", tmp_path, {k: judged[k] for k in inputs}, **params)


# --- a served judge ---------------------------------------------------------------------------------------------


class CannedJudge(BaseHTTPRequestHandler):
    """POST /v1/completions: replies as `server.mode` says; records each request's JSON in `server.requests`."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append((self.path, body))
        mode = self.server.mode
        if mode == "slow":
            time.sleep(1.5)
        if mode == "error":
            self.send_error(500, "judge overloaded")
            return
        replies = ["Score: 7", "no idea", "Score: 11"]
        answer = b"{not json" if mode == "garbled" else json.dumps(
            {"choices": [{"index": i, "text": replies[i % 3]} for i in reversed(range(len(body["prompt"])))]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        try:
            self.wfile.write(answer)
        except ConnectionError:  # the slow judge's client has given up
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CannedJudge)
    httpd.daemon_threads, httpd.requests, httpd.mode = True, [], "ok"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def served(server: ThreadingHTTPServer, **settings) -> JudgeReward:
    params = JudgeParams(url=f"http://127.0.0.1:{server.server_address[1]}/", model="judge-7b", max_new_tokens=3,
                         template="{prompt} {completion}", **settings)
    return JudgeReward(served_judge(params), params)


def test_a_served_judge_is_asked_once_per_batch_and_parsed(server):
    reward = served(server)
    assert reward(["c0", "c1", "c2", "c3"], prompt=["p"] * 4) == [0.7, 0.0, 0.0, 0.7]  # answers in any order
    assert reward.take_unparsed() == 2
    assert server.requests == [("/v1/completions", {"prompt": ["p c0", "p c1", "p c2", "p c3"], "max_tokens": 3,
                                                     "temperature": 0.0, "model": "judge-7b"})]


@pytest.mark.parametrize("mode", ["slow", "error", "garbled"])
def test_a_failing_served_judge_counts_as_unparsed(server, mode, capsys):
    server.mode = mode
    reward = served(server, timeout_s=0.3)
    start = time.monotonic()
    assert reward(["c0", "c1"], prompt=["p", "p"]) == [0.0, 0.0]
    assert time.monotonic() - start < 1.2  # the slow judge is not waited for
    assert reward.take_unparsed() == 2
    assert "2 replies count as unparsed" in capsys.readouterr().err


def test_an_unreachable_served_judge_counts_as_unparsed():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = JudgeParams(url=f"http://127.0.0.1:{port}", timeout_s=1.0)
    reward = JudgeReward(served_judge(params), params)
    assert reward(["c"], prompt=["p"]) == [0.0] and reward.unparsed == 1
