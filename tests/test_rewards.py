"""Reward functions: hand cases per function, then adversarial inputs (time-bounded, nothing executed)."""

from __future__ import annotations

import builtins
import signal
import subprocess
import sys
import time

import pytest

from stages import rewards
from stages.rewards import (REWARDS, RewardConfigError, accuracy_reward, build_reward, extract_answer, format_reward,
                            language_consistency_reward, math_verify_reward, overlong_reward, reasoning_gym_reward,
                            repetition_ratio, reward_model_reward, routed_reward, time_bounded, verify_answer,
                            word_script)

GREEK = "αβγ δελτα ωμεγα"


# --- accuracy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("predicted, reference", [
    ("42", "42"), ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "1/2"), ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-1/2"), ("−3", "-3"), ("1,000", "1000"), ("1,234.50", "1234.5"), ("42.", "42"),
    ("  7 ", "7"), ("$12$", "12"), ("+5", "5"), ("2/4", "1/2"), ("1{,}000", "1000"), (".5", "0.5"),
    ("x = y", "x  =  y"),
])
def test_verify_answer_equivalent(predicted: str, reference: str) -> None:
    assert verify_answer(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("41", "42"), ("-3", "3"), ("1,00", "100"), ("1/0", "0"), ("1 2", "12"), ("0.33", "1/3"), ("", "0"),
    ("1e3", "1000"), ("1" * 61, "1" * 61 + ".0"), ("5" * 101, "5" * 101),
])
def test_verify_answer_different(predicted: str, reference: str) -> None:
    assert not verify_answer(predicted, reference)


def test_extract_answer() -> None:
    assert extract_answer("<think>x</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("so \\boxed{3} or rather \\boxed{\\frac{1}{4}}") == "\\frac{1}{4}"
    assert extract_answer("<answer>\\boxed{5}</answer>") == "5"
    assert extract_answer("\\boxed{9} <answer>8</answer>") == "8"
    assert extract_answer("\\boxed{1") is None
    assert extract_answer("no answer here") is None
    assert extract_answer("</answer> \\boxed{4}") == "4"


def test_accuracy_reward() -> None:
    completions = ["<answer>1/2</answer>", "\\boxed{0.5}", "<answer>3</answer>", "nothing", "<answer>2</answer>"]
    answers = ["0.5", "1/2", "4", "0", None]
    assert accuracy_reward(completions, answer=answers, prompt=["p"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert accuracy_reward(["<answer>1</answer><answer>2</answer>"], answer=[2]) == [1.0]
    with pytest.raises(ValueError):
        accuracy_reward(["a", "b"], answer=["1"])


# --- format ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, expected", [
    ("<think>reason</think><answer>4</answer>", 1.0),
    ("  <think>\nreason\n</think>\n<answer>\n4\n</answer>\n", 1.0),
    ("<answer>4</answer>", 0.0),
    ("<answer>4</answer><think>r</think>", 0.0),
    ("hello <think>r</think><answer>4</answer>", 0.0),
    ("<think>r</think><answer>4</answer> bye", 0.0),
    ("<think>r</think> between <answer>4</answer>", 0.0),
    ("<think>a<think>b</think></think><answer>4</answer>", 0.0),
    ("<think>a<answer>b</answer></think><answer>4</answer>", 0.0),
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0),
    ("<think>r</think><answer> </answer>", 0.0),
    ("<think>r<answer>4</answer>", 0.0),
])
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward([completion], answer=["4"]) == [expected]


# --- language consistency -------------------------------------------------------------------------------------


def test_word_script() -> None:
    assert word_script("hello,") == "latin"
    assert word_script("café") == "latin"
    assert word_script("ΑΒΓ") == "greek"
    assert word_script("привет") == "cyrillic"
    assert word_script("中文") == "cjk"
    assert word_script("مرحبا") == "arabic"
    assert word_script("αβc") == "greek"
    assert word_script("123") == word_script("...") == word_script("<>") == "neutral"


def test_language_consistency_reward() -> None:
    half = "<think>alpha beta αβγ δελτα 42 !!</think><answer>1</answer>"
    assert language_consistency_reward(["<think>all latin words here</think>"], language=["latin"]) == [1.0]
    assert language_consistency_reward([half], language=["greek"]) == [0.5]
    assert language_consistency_reward([half], language=["el"]) == [0.5]
    assert language_consistency_reward([GREEK], language=["en"]) == [0.0]
    assert language_consistency_reward(["<think>кот кот cat</think>"], language=["ru"]) == [pytest.approx(2 / 3)]
    # no think block: the whole completion (tags dropped) is the chain of thought
    assert language_consistency_reward([f"{GREEK} <answer>ok</answer>"], language=["greek"]) == [0.75]
    # target detected from the prompt's dominant script; the language column wins over the prompt
    prompts = [f"λυσε {GREEK} solve", "solve this problem please"]
    completions = [f"<think>{GREEK}</think>", f"<think>{GREEK} and</think>"]
    assert language_consistency_reward(completions, prompt=prompts) == [1.0, 0.25]
    assert language_consistency_reward(completions, prompt=prompts, language=["latin", None]) == [0.0, 0.25]
    chat = [[{"role": "user", "content": GREEK}]]
    assert language_consistency_reward([f"<think>{GREEK}</think>"], prompt=chat) == [1.0]


def test_language_consistency_edge_cases() -> None:
    assert language_consistency_reward(["<think>123 ...</think>"], language=["latin"]) == [0.0]
    assert language_consistency_reward(["words"], prompt=["1 + 1 = ?"]) == [0.0]
    with pytest.raises(ValueError, match="klingon"):
        language_consistency_reward(["x"], language=["klingon"])
    with pytest.raises(ValueError, match="language"):
        language_consistency_reward(["x"])


# --- overlong -------------------------------------------------------------------------------------------------


def test_overlong_reward() -> None:
    lengths = [0, 6, 8, 9, 10, 11, 1000]
    rewards = overlong_reward(["x"] * 7, completion_length=lengths, max_length=10, buffer=4)
    assert rewards == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert overlong_reward(["a " * 8], max_length=10, buffer=4, penalty=2.0) == [-1.0]
    assert overlong_reward(["a " * 10, "a " * 11], max_length=10, buffer=0) == [0.0, -1.0]
    assert overlong_reward(["x"] * 3, completion_length=[9, 10, 11], max_length=10, buffer=0, penalty=2.0) == \
        [0.0, 0.0, -2.0]  # buffer 0: a step at max_length
    with pytest.raises(ValueError, match="buffer"):
        overlong_reward(["x"], max_length=10, buffer=20)


# --- reward model, routing, combination -----------------------------------------------------------------------


def test_reward_model_reward() -> None:
    calls = []

    def scorer(prompts: list[str], texts: list[str]) -> list[float]:
        calls.append((prompts, texts))
        return [float(len(t)) for t in texts]

    completions = ["<think>long reasoning</think><answer>ok</answer>", "<think>r</think> summary ", "plain"]
    prompts = ["p1", "p2", [{"role": "user", "content": "p3"}]]
    assert reward_model_reward(scorer)(completions, prompt=prompts) == [float(len(c)) for c in completions]
    assert calls[-1] == (prompts, completions)  # a chat prompt reaches the reward model's chat template whole
    assert reward_model_reward(scorer, score_on="answer")(completions, prompt=prompts) == [2.0, 7.0, 5.0]
    assert calls[-1][1] == ["ok", "summary", "plain"]
    with pytest.raises(ValueError, match="score_on"):
        reward_model_reward(scorer, score_on="summary")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scores"):
        reward_model_reward(lambda p, t: [0.0])(["a", "b"], prompt=["p", "q"])


def test_routed_reward_scatters_in_order() -> None:
    calls = []

    def tagged(tag: float):
        def reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
            calls.append((tag, completions, answer))
            return [tag + int(c) for c in completions]
        return reward

    reward = routed_reward("task", {"reasoning": tagged(100.0), "general": tagged(200.0)})
    task = ["general", "reasoning", "general", "reasoning", "reasoning"]
    completions = ["0", "1", "2", "3", "4"]
    assert reward(completions, task=task, answer=list("abcde"), tag="x") == [200.0, 101.0, 202.0, 103.0, 104.0]
    assert calls == [(200.0, ["0", "2"], ["a", "c"]), (100.0, ["1", "3", "4"], ["b", "d", "e"])]
    with pytest.raises(KeyError, match="chat.*general.*reasoning"):
        reward(["0"], task=["chat"], answer=["a"])
    with pytest.raises(KeyError, match="task"):
        reward(["0"], answer=["a"])


def test_build_reward() -> None:
    assert set(REWARDS) == {"accuracy", "format", "language_consistency", "overlong", "reasoning_gym", "math_verify",
                            "exact_match", "tool_format"}
    assert build_reward("format") is format_reward
    overlong = build_reward("overlong", max_length=10, buffer=4)
    assert overlong(["x"], completion_length=[8]) == [-0.5]
    with pytest.raises(KeyError) as err:
        build_reward("acuracy")
    assert str(err.value) == ("unknown reward 'acuracy'; allowed: accuracy, exact_match, format, language_consistency, "
                              "math_verify, overlong, reasoning_gym, tool_format, or an import path `module:function` "
                              "of your own")
    with pytest.raises(ValueError, match="acuracy"):
        build_reward("acuracy")
    with pytest.raises(RewardConfigError, match="max_len.*allowed: max_length, buffer, penalty"):
        build_reward("overlong", max_len=10)
    with pytest.raises(RewardConfigError, match="allowed: none"):
        build_reward("accuracy", tolerance=0.1)
    with pytest.raises(ValueError, match="buffer"):
        build_reward("overlong", max_length=10, buffer=-1)
    with pytest.raises(ValueError, match="mode must be one of strict, lenient, got 'loose'"):
        build_reward("math_verify", mode="loose")
    assert build_reward("reasoning_gym", mode="lenient")([]) == []


# --- library verifiers: strict (the answer in <answer> tags) and lenient (else the last number / line) ----------

# a chain_sum row as the reasoning_gym data kind writes it: 17 + 25 = 42
CHAIN_SUM = {"task": "chain_sum", "answer": "42", "task_config": '{"max_terms": 2, "min_terms": 2}',
             "prompt": [{"role": "user", "content": "State the final answer to the following arithmetic problem: "
                                                    "17 + 25 ="}],
             "metadata": '{"source_dataset": "chain_sum", "source_index": 0, "num_terms": 2, "num_digits": 2, '
                         '"expression": "17 + 25", "difficulty": {"num_terms": [2, 2], "num_digits": [1, 2]}}'}
VERIFIED = [  # completion, strict score, lenient score
    ("<answer>42</answer>", 1.0, 1.0),
    ("<think>17 + 25 = 42</think>\n<answer> 42 </answer>", 1.0, 1.0),
    ("<answer>41</answer>", 0.0, 0.0),
    ("<answer>41</answer> oh wait, 42", 0.0, 0.0),  # the tag is the answer, even in lenient mode
    ("17 + 25 = 42", 0.0, 1.0),  # untagged: the last number
    ("The answer is 42.", 0.0, 1.0),
    ("17 + 25 = 42, or maybe 43", 0.0, 0.0),
    ("I do not know", 0.0, 0.0),  # no number at all
    ("", 0.0, 0.0),
]


def rows_of(row: dict, n: int) -> dict[str, list]:
    return {key: [value] * n for key, value in row.items()}


@pytest.mark.parametrize("reward", [reasoning_gym_reward, math_verify_reward])
def test_verifiers_strict_and_lenient(reward) -> None:
    completions = [c for c, _, _ in VERIFIED]
    columns = rows_of(CHAIN_SUM, len(completions))
    assert reward(completions, mode="strict", **columns) == [s for _, s, _ in VERIFIED]
    assert reward(completions, mode="lenient", **columns) == [s for _, _, s in VERIFIED]
    assert reward(completions, **columns) == [s for _, s, _ in VERIFIED]  # strict by default


def test_math_verify_judges_equivalent_forms() -> None:
    completions = ["<answer>\\frac{1}{2}</answer>", "<answer>0.5</answer>", "<answer>$\\frac{2}{4}$</answer>",
                   "<answer>\\boxed{1/2}</answer>", "<answer>1/3</answer>", "so x = \\frac{1}{2}"]
    assert math_verify_reward(completions, answer=["1/2"] * 6) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert math_verify_reward(completions[-1:], answer=["\\frac{1}{2}"], mode="lenient") == [1.0]  # the last line


def test_reasoning_gym_lenient_takes_the_final_line_of_a_non_numeric_answer() -> None:
    row = {"task": "letter_counting", "answer": "3", "metadata": '{"span": ["x"], "target_letter": "r"}'}
    assert reasoning_gym_reward(["there are\n3"], mode="lenient", **rows_of(row, 1)) == [1.0]
    spell = {"task": "spell_backward", "answer": "olleh", "metadata": '{"word": "hello"}'}
    right, last_line_wrong = reasoning_gym_reward(["Reversed:\nolleh", "olleh\nDone."], mode="lenient",
                                                  **rows_of(spell, 2))
    assert right == 1.0 and last_line_wrong < 1.0  # the task's own scorer gives partial credit


VERIFIER_ADVERSARIAL = [
    "1 " * 1_000_000 + "<answer>" + "9" * 5_000 + "</answer>",  # long, and an answer over every cap
    "<answer>$9^{9^{9^{9}}}$</answer>",  # symbolic work with no end: cut by the timer
    "<answer>$(10^{100})!$</answer>",
    "<answer>$2^{2^{40}} - 2^{2^{40}}$</answer>",
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<answer>" * 50_000 + "42",
    "- " * 500_000 + "42" + "," * 100_000,
    "\\boxed{" * 50_000,
]


@pytest.mark.parametrize("text", VERIFIER_ADVERSARIAL, ids=range(len(VERIFIER_ADVERSARIAL)))
@pytest.mark.parametrize("reward", [reasoning_gym_reward, math_verify_reward])
def test_verifiers_are_bounded_in_time(reward, text: str, no_eval, monkeypatch) -> None:
    monkeypatch.setattr(rewards, "VERIFY_SECONDS", 0.2)
    for mode in ("strict", "lenient"):
        start = time.perf_counter()
        values = reward([text], mode=mode, **rows_of(CHAIN_SUM, 1))
        assert time.perf_counter() - start < 1.0, (mode, text[:40])
        assert len(values) == 1 and isinstance(values[0], float)


def test_time_bounded_stops_the_timer_and_restores_the_handler() -> None:
    previous = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    assert time_bounded(lambda: time.sleep(5) or 1.0, seconds=0.2) == 0.0
    assert time.perf_counter() - start < 1.0
    assert time_bounded(lambda: 0.5) == 0.5
    assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_repetition_ratio() -> None:
    assert repetition_ratio("a b c d e") == 0.0
    assert repetition_ratio("a b") == 0.0
    assert repetition_ratio("a a a a a a", n=1) == pytest.approx(5 / 6)
    assert repetition_ratio("x y z x y z", n=3) == pytest.approx(1 / 4)
    assert repetition_ratio("") == 0.0
    with pytest.raises(ValueError):
        repetition_ratio("a", n=0)


# --- adversarial ----------------------------------------------------------------------------------------------


ADVERSARIAL = [
    "x" * 100_000,
    "<answer>" + "9" * 100_000 + "</answer>",
    "<answer>1e999999</answer>",
    "\\boxed{1e999999}",
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<think>" * 10_000,
    "<answer>" * 5_000,
    "</answer>" * 5_000 + "<answer>" * 5_000,
    "<think>" * 10_000 + "</think>" * 10_000 + "<answer>" * 5_000 + "</answer>" * 5_000,
    "\\boxed{" + "{" * 50_000,
    "\\boxed{" * 50_000,
    "\\boxed{" + "}" * 50_000 + "{" * 50_000,
    "def f():\n    return [x for x in range(10**9)]  # {} $ \\frac{1}{0}\n" * 2_000,
    "<answer>\\frac{" + "9" * 50_000 + "}{1}</answer>",
    "<answer>" + "1," * 40 + "000</answer>",
    "<answer>" + "-" * 99 + "1</answer>",
    "<answer>" + "1/" * 50 + "1</answer>",
    "ab " * 33_000,
    "αβ𝔸ﬀ中\u0301 " * 20_000,
]


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    # a generous bound: linear scans take milliseconds; catastrophic backtracking would take minutes
    assert time.perf_counter() - start < 2.0, f"{getattr(fn, '__name__', fn)} too slow"
    return result


@pytest.fixture
def no_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    """eval/exec/compile raise when called from project code (pytest itself may still compile)."""
    def guarded(name: str):
        original = getattr(builtins, name)

        def call(*args: object, **kwargs: object):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("stages"):
                raise AssertionError(f"untrusted text reached {name}")
            return original(*args, **kwargs)
        return call

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, guarded(name))


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_bounded_and_inert(text: str, tmp_path, no_eval) -> None:
    sentinel = tmp_path / "pwned"
    texts = [text, f"<answer>__import__('pathlib').Path({str(sentinel)!r}).touch()</answer>"]
    ref = ["9" * 100_000] * 2
    for name, fn in [("accuracy", accuracy_reward), ("format", format_reward),
                     ("language_consistency", language_consistency_reward),
                     ("overlong", build_reward("overlong", max_length=100, buffer=10))]:
        values = _timed(fn, texts, answer=ref, prompt=texts, language=[None, None])
        assert len(values) == 2 and all(isinstance(v, float) for v in values), name
    for reward in (reward_model_reward(lambda p, t: [0.0] * len(t), score_on="answer"),
                   routed_reward("task", {"r": accuracy_reward})):
        assert all(isinstance(v, float) for v in _timed(reward, texts, prompt=texts, answer=ref, task=["r", "r"]))
    assert isinstance(_timed(repetition_ratio, text), float)
    assert isinstance(_timed(verify_answer, text, text), bool)
    _timed(extract_answer, text)
    _timed(word_script, text)
    assert not sentinel.exists()


def test_huge_numbers_are_not_parsed() -> None:
    assert accuracy_reward(["<answer>" + "9" * 100_000 + "</answer>"], answer=["9" * 100_000]) == [0.0]
    assert accuracy_reward(["<answer>" + "9" * 60 + "</answer>"], answer=["9" * 60 + "/1"]) == [1.0]
    assert accuracy_reward(["<answer>" + "9" * 61 + "</answer>"], answer=["9" * 61 + "/1"]) == [0.0]
    assert accuracy_reward(["<answer>1e999999</answer>"], answer=["1e999999"]) == [1.0]


def test_library_imports_and_warm_up_are_outside_the_timer() -> None:
    # a fresh interpreter: importing math-verify and reasoning-gym takes seconds, judging "4" milliseconds
    code = ("from stages import rewards\n"
            "rewards.VERIFY_SECONDS = 0.05\n"
            "assert rewards.math_verify_reward(['<answer>4</answer>'], answer=['4']) == [1.0]\n"
            "assert rewards.reasoning_gym_reward(['<answer>4</answer>'], answer=['4'], task=['chain_sum'], "
            "metadata=['{}']) == [1.0]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
