"""Reward functions: pure callables `(completions, **columns) -> list[float]`, chosen by name.

Columns arrive as keyword lists aligned with `completions` (`answer=[...]`, `prompt=[...]`, `language=[...]`,
`completion_length=[...]`); every reward ignores the columns it does not use.

Completions are untrusted model output. Nothing here evaluates text (no eval/exec/sympify/literal_eval), every scan
is linear in the completion length, regexes have no nested quantifiers, and the math verifier looks at most
`MAX_ANSWER_CHARS` characters and numbers of at most `MAX_DIGITS` digits, so one call costs O(len(completion)) plus
a constant. The library verifiers (`reasoning_gym`, `math_verify`) see only the extracted answer (at most
`MAX_ANSWER_CHARS`, or `MAX_TASK_ANSWER_CHARS` for a task's own scorer) and run under a `VERIFY_SECONDS` timer.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal

from stages.chat import prompt_text
from stages.registry import REWARDS
from stages.timer import OutOfTime, within

RewardFn = Callable[..., list[float]]
Scorer = Callable[[list[Any], list[str]], list[float]]  # (prompts: text or chat, completions) -> scores

MAX_ANSWER_CHARS = 100
MAX_DIGITS = 60
MAX_TASK_ANSWER_CHARS = 2000  # a reasoning-gym task's answer may be a list or a grid
VERIFY_SECONDS = 1.0  # wall-clock budget of one library verification
MODES = ("strict", "lenient")  # strict: the answer inside <answer>...</answer>; lenient: else the last number / line

_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_WARM_SCORERS: set[tuple[str, str]] = set()  # (task, config) whose scorer has run once
_R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_SCRIPT_OF_NAME = {
    "LATIN": "latin", "GREEK": "greek", "CYRILLIC": "cyrillic", "ARMENIAN": "armenian", "GEORGIAN": "georgian",
    "HEBREW": "hebrew", "ARABIC": "arabic", "DEVANAGARI": "devanagari", "BENGALI": "bengali", "TAMIL": "tamil",
    "THAI": "thai", "CJK": "cjk", "HIRAGANA": "cjk", "KATAKANA": "cjk", "HANGUL": "hangul",
}
_SCRIPTS = frozenset(_SCRIPT_OF_NAME.values())
_SCRIPT_OF_ISO = {
    **dict.fromkeys(("en", "fr", "de", "es", "it", "pt", "nl", "pl", "tr", "vi", "id", "sv", "da", "fi"), "latin"),
    "el": "greek", **dict.fromkeys(("ru", "uk", "bg", "sr", "be", "kk"), "cyrillic"),
    "zh": "cjk", "ja": "cjk", "ko": "hangul", "ar": "arabic", "fa": "arabic", "he": "hebrew", "hi": "devanagari",
    "th": "thai", "hy": "armenian", "ka": "georgian", "bn": "bengali", "ta": "tamil",
}


class RewardConfigError(KeyError, ValueError):
    """Unknown reward name or parameter in a pipeline config; catchable as KeyError or ValueError."""

    def __str__(self) -> str:
        return str(self.args[0])


class RewardError(ValueError):
    """A reward raised, or returned anything but one number per completion: bad input (the stage exits 2)."""


# --- answer extraction and math verification -------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if absent or unclosed. One linear scan."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 1
    for i in range(start + len("\\boxed{"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):i]
    return None


def extract_answer(text: str) -> str | None:
    """Final answer of a completion: the last `<answer>...</answer>` (unwrapping a `\\boxed{}` inside it), else the
    last balanced `\\boxed{...}`, else None. Stripped."""
    tagged = tagged_answer(text)
    boxed = _last_boxed(text if tagged is None else tagged)
    return tagged if boxed is None else boxed.strip()


def normalize_answer(s: str) -> str:
    """Strip whitespace, `$` delimiters and one trailing period; unify the Unicode minus and LaTeX `{,}`."""
    s = s.strip().strip("$").strip().replace("\u2212", "-").replace("{,}", ",")
    return s[:-1].rstrip() if s.endswith(".") else s


def _parse_decimal(s: str) -> Fraction | None:
    """Signed integer or decimal, optionally with strict thousands separators ("1,234.5"); None otherwise."""
    s = s.strip()
    sign = -1 if s[:1] == "-" else 1
    s = s[1:] if s[:1] in ("-", "+") else s
    whole, _, frac = s.partition(".")
    if "," in whole:
        groups = whole.split(",")
        if not 1 <= len(groups[0]) <= 3 or any(len(g) != 3 for g in groups[1:]):
            return None
        whole = "".join(groups)
    digits = whole + frac
    if not digits or len(digits) > MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return sign * Fraction(int(digits), 10 ** len(frac))


def parse_number(s: str) -> Fraction | None:
    """Exact value of a decimal, `a/b` or `\\frac{a}{b}` (optionally signed); None if `s` is anything else."""
    match = _FRAC.fullmatch(s[1:].lstrip() if s[:1] in ("-", "+") else s)
    if match:
        num, den = match.groups()
        sign = -1 if s[:1] == "-" else 1
    elif "/" in s:
        num, _, den = s.partition("/")
        sign = 1
    else:
        return _parse_decimal(s)
    num_value, den_value = _parse_decimal(num), _parse_decimal(den)
    if num_value is None or not den_value:
        return None
    return sign * num_value / den_value


def verify_answer(predicted: str, reference: str) -> bool:
    """True iff `predicted` equals `reference`: exactly as fractions when both parse as numbers ("0.5" == "1/2" ==
    "\\frac{1}{2}", "1,000" == "1000", "−3" == "-3"), else as whitespace-collapsed strings. A prediction longer than
    MAX_ANSWER_CHARS is wrong; numbers longer than MAX_DIGITS digits do not parse (so compare as strings)."""
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    pred_value, ref_value = parse_number(pred), parse_number(ref)
    if pred_value is not None and ref_value is not None:
        return pred_value == ref_value
    return " ".join(pred.split()) == " ".join(ref.split())


def accuracy_reward(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 if the extracted final answer verifies against the reference `answer`, else 0.0 (also when no answer
    is found or the reference is None)."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        predicted = extract_answer(completion)
        ok = predicted is not None and reference is not None and verify_answer(predicted, str(reference))
        rewards.append(1.0 if ok else 0.0)
    return rewards


# --- library verifiers: reasoning-gym's scorers and math-verify, strict or lenient -------------------------------


def tagged_answer(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, stripped; None without one (R1's template requires the tags)."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    return text[start + len("<answer>"):end].strip() if start != -1 else None


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group() if last else None


def _final_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines()]
    return next((line for line in reversed(lines) if line), None)


def answer_of(completion: str, reference: Any, mode: str) -> str | None:
    """The completion's final answer as a verifier judges it. `strict`: the `<answer>` content (None without tags).
    `lenient`: that, else the last number when the reference is a plain (decimal) number, else the last non-empty
    line (whose last expression math-verify finds, e.g. a `\\frac`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    tagged = tagged_answer(completion)
    if tagged is not None or mode == "strict":
        return tagged
    if reference is not None and _parse_decimal(normalize_answer(str(reference))) is not None:
        return _last_number(completion)
    return _final_line(completion)


def time_bounded(fn: Callable[[], float], seconds: float | None = None) -> float:
    """`fn()`, or 0.0 when it runs past `seconds` (default VERIFY_SECONDS; `stages.timer.within`)."""
    try:
        return within(fn, VERIFY_SECONDS if seconds is None else seconds)
    except OutOfTime:
        return 0.0


@functools.lru_cache(maxsize=64)
def task_dataset(task: str, config: str = "{}") -> Any:
    """The reasoning-gym dataset object of `task` with its JSON `config` (for its `score_answer`), cached."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(config or "{}"))


def _scorer(task: str, config: str, entry: dict[str, Any]) -> Any:
    """`task_dataset`, its scorer first run on a row's own (trusted) answer outside any timer: the first call of
    some scorers imports or builds what later calls reuse."""
    dataset = task_dataset(task, config)
    if (task, config) not in _WARM_SCORERS:
        dataset.score_answer(entry["answer"], entry)
        _WARM_SCORERS.add((task, config))
    return dataset


def reasoning_gym_reward(completions: list[str], task: list[str] | None = None, metadata: list[Any] | None = None,
                         answer: list[Any] | None = None, prompt: list[Any] | None = None,
                         task_config: list[str | None] | None = None, *, mode: str = "strict", **_: Any
                         ) -> list[float]:
    """The row's reasoning-gym task's own `score_answer` (in [0, 1]) on the answer `answer_of` extracts (0.0 when
    there is none, it is longer than MAX_TASK_ANSWER_CHARS, or scoring runs past VERIFY_SECONDS). Rows carry `task`,
    the entry's `answer` and `metadata` (a JSON string or a dict), and optionally `task_config` (JSON) and `prompt`,
    as the `reasoning_gym` data kind writes them."""
    answer_of("", None, mode)  # a bad mode fails on any batch, the empty one included
    if completions and (task is None or metadata is None or answer is None):
        raise ValueError("the reasoning_gym reward needs `task`, `answer` and `metadata` columns (the "
                         "reasoning_gym data kind writes them)")
    rewards = []
    for i, completion in enumerate(completions):
        predicted = answer_of(completion, answer[i], mode)
        if predicted is None or len(predicted) > MAX_TASK_ANSWER_CHARS:
            rewards.append(0.0)
            continue
        entry = {"question": prompt_text(prompt[i]) if prompt and prompt[i] else "", "answer": str(answer[i]),
                 "metadata": json.loads(metadata[i]) if isinstance(metadata[i], str) else metadata[i]}
        config = (task_config[i] if task_config else None) or "{}"
        dataset = _scorer(task[i], config, entry)
        rewards.append(float(time_bounded(lambda: dataset.score_answer(predicted, entry))))
    return rewards


@functools.cache
def _math_verify() -> Any:
    """math-verify, imported and warmed up outside any timer (its first LaTeX parse builds the parser), with its
    warning that its own (signal, whole-second) timeout is off silenced: `time_bounded` is ours."""
    import math_verify
    from math_verify import grader, parser

    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.parse("$\\frac{1}{2}$", parsing_timeout=None)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parsed_reference(reference: str) -> tuple:
    """math-verify's parse of a (trusted) reference answer, retried as inline LaTeX; cached: references repeat."""
    parse = _math_verify().parse
    return tuple(parse(reference, parsing_timeout=None) or parse(f"${reference}$", parsing_timeout=None))


def _math_verified(predicted: str, gold: tuple) -> float:
    math_verify = _math_verify()
    return float(bool(gold) and math_verify.verify(list(gold), math_verify.parse(predicted, parsing_timeout=None),
                                                   timeout_seconds=None))


def math_verify_reward(completions: list[str], answer: list[Any] | None = None, *, mode: str = "strict", **_: Any
                       ) -> list[float]:
    """1.0 iff math-verify (parse + verify, symbolic equivalence) finds the extracted answer (`answer_of`) equal to
    the reference `answer`, else 0.0 (also for no answer, one longer than MAX_ANSWER_CHARS, or past
    VERIFY_SECONDS)."""
    answer_of("", None, mode)
    if completions and answer is None:
        raise ValueError("the math_verify reward needs an `answer` column")
    rewards = []
    for completion, reference in zip(completions, answer or [], strict=True):
        predicted = answer_of(completion, reference, mode)
        ok = predicted is not None and reference is not None and len(predicted) <= MAX_ANSWER_CHARS
        if ok:
            gold = _parsed_reference(str(reference))
            rewards.append(time_bounded(lambda: _math_verified(predicted, gold)))
        else:
            rewards.append(0.0)
    return rewards


def verifier_metrics(reward: RewardFn, rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """Held-out metrics of a library verifier `reward`: accuracy (score 1) with the answer in `<answer>` tags
    (`accuracy_strict`) and by the last number / line too (`accuracy_lenient`), the share with tags
    (`tagged_rate`), following the R1 template (`format_rate`), and the mean response length in words."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    metrics = {f"accuracy_{mode}": [float(s >= 1.0) for s in reward(completions, mode=mode, **columns)]
               for mode in MODES}
    metrics |= {"tagged_rate": [float(tagged_answer(c) is not None) for c in completions],
                "format_rate": format_reward(completions),
                "mean_response_length": [len(c.split()) for c in completions]}
    return {name: sum(values) / len(values) for name, values in metrics.items()}


def evaluate_reasoning_gym(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """The `reasoning_gym` evaluator: `verifier_metrics` by each row's task's own scorer."""
    return verifier_metrics(reasoning_gym_reward, rows, completions)


def evaluate_math_verify(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """The `math_verify` evaluator: `verifier_metrics` by math-verify against each row's `answer`."""
    return verifier_metrics(math_verify_reward, rows, completions)


# --- format ---------------------------------------------------------------------------------------------------


def _is_r1_format(text: str) -> bool:
    """`<think>...</think><answer>...</answer>`, each tag once, only whitespace outside and between, answer
    non-empty."""
    s = text.strip()
    if not (s.startswith("<think>") and s.endswith("</answer>")) or any(s.count(tag) != 1 for tag in _R1_TAGS):
        return False
    think_end, answer_start = s.find("</think>"), s.find("<answer>")
    between = s[think_end + len("</think>"):answer_start]
    inner = s[answer_start + len("<answer>"):-len("</answer>")]
    return think_end < answer_start and not between.strip() and bool(inner.strip())


def format_reward(completions: list[str], **_: Any) -> list[float]:
    """1.0 iff the completion follows the R1-Zero template `<think>...</think><answer>...</answer>`, else 0.0."""
    return [1.0 if _is_r1_format(c) else 0.0 for c in completions]


# --- language consistency -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _char_script(ch: str) -> str | None:
    """Script of a letter (by its Unicode name), "other" for letters of unlisted scripts, None for non-letters."""
    if not ch.isalpha():
        return None
    if ch.isascii():
        return "latin"
    for token in unicodedata.name(ch, "").split():
        if token in _SCRIPT_OF_NAME:
            return _SCRIPT_OF_NAME[token]
    return "other"


def word_script(word: str) -> str:
    """Script most of the word's letters are in ("latin", "greek", "cyrillic", "cjk", "arabic", ...; "other" for
    unlisted scripts; ties go to the first seen), or "neutral" for words without letters (digits, punctuation)."""
    if word.isascii():
        return "latin" if any(map(str.isalpha, word)) else "neutral"
    counts = Counter(s for s in map(_char_script, word) if s is not None)
    return max(counts, key=counts.__getitem__) if counts else "neutral"


def _script_words(text: str) -> list[str]:
    """Scripts of the whitespace-separated words of `text`, R1 tags removed, neutral words dropped."""
    for tag in _R1_TAGS:
        text = text.replace(tag, " ")
    return [s for s in map(word_script, text.split()) if s != "neutral"]


def _chain_of_thought(completion: str) -> str:
    """Text between the first `<think>` and the next `</think>`, or the whole completion if there is no such block."""
    start = completion.find("<think>")
    end = completion.find("</think>", start) if start != -1 else -1
    return completion[start + len("<think>"):end] if end != -1 else completion


def _script_of_language(language: str) -> str:
    """Script name for a `language` value: a script name itself or an ISO 639-1 code ("el", "zh-CN")."""
    key = str(language).strip().lower()
    script = key if key in _SCRIPTS else _SCRIPT_OF_ISO.get(key.replace("_", "-").split("-")[0])
    if script is None:
        raise ValueError(f"unknown language {language!r}; use a script ({', '.join(sorted(_SCRIPTS))}) "
                         f"or an ISO code ({', '.join(sorted(_SCRIPT_OF_ISO))})")
    return script


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: a string as is, a chat (list of `{"role", "content"}`) as its joined contents."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def _target_script(prompt: Any, language: Any) -> str | None:
    """The `language` value's script if given, else the dominant script of the prompt (None if it has no words)."""
    if language:
        return _script_of_language(language)
    if prompt is None:
        raise ValueError("language_consistency needs a `language` or a `prompt` column")
    counts = Counter(_script_words(_prompt_text(prompt)))
    return counts.most_common(1)[0][0] if counts else None


def language_consistency_reward(completions: list[str], prompt: list[Any] | None = None,
                                language: list[Any] | None = None, **_: Any) -> list[float]:
    """Share of the chain-of-thought words written in the target language's script (DeepSeek-R1 §2.3.3).

    The target is the row's `language` (a script name like "latin"/"greek" or an ISO code like "en"/"el"), else
    the dominant script of its prompt. Words without letters are not counted; no counted words (or no target
    found in the prompt) gives 0.0. Words are whitespace-separated, so an unspaced CJK run counts as one word.
    """
    n = len(completions)
    rewards = []
    for completion, row_prompt, row_language in zip(completions, prompt or [None] * n, language or [None] * n,
                                                    strict=True):
        target = _target_script(row_prompt, row_language)
        scripts = _script_words(_chain_of_thought(completion))
        rewards.append(scripts.count(target) / len(scripts) if scripts and target else 0.0)
    return rewards


# --- length -----------------------------------------------------------------------------------------------------


def overlong_reward(completions: list[str], completion_length: list[int] | None = None, *, max_length: int = 1024,
                    buffer: int = 256, penalty: float = 1.0, **_: Any) -> list[float]:
    """DAPO soft overlong punishment (eq. 13): 0 up to `max_length - buffer`, then linear down to `-penalty` at
    `max_length`, `-penalty` beyond. Length is `completion_length` (tokens) if given, else the whitespace word
    count."""
    if not (0 <= buffer <= max_length and penalty >= 0):
        raise ValueError(f"overlong needs 0 <= buffer <= max_length and penalty >= 0, got max_length={max_length}, "
                         f"buffer={buffer}, penalty={penalty}")
    lengths = completion_length if completion_length is not None else [len(c.split()) for c in completions]
    soft_start = max_length - buffer
    rewards = []
    for _completion, length in zip(completions, lengths, strict=True):
        if length <= soft_start:
            rewards.append(0.0)
        elif length <= max_length:
            rewards.append(-penalty * (length - soft_start) / buffer)
        else:
            rewards.append(-float(penalty))
    return rewards


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of repeated word n-grams, `1 - distinct / total` (0.0 when there are fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# --- composition ----------------------------------------------------------------------------------------------


def _final_text(completion: str) -> str:
    """What a helpfulness judge sees: the `<answer>` content, else the text after `</think>`, else everything."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end != -1 else -1
    if start != -1:
        return completion[start + len("<answer>"):end].strip()
    _, think_end, after = completion.rpartition("</think>")
    return after.strip() if think_end else completion


def reward_model_reward(scorer: Scorer, score_on: Literal["full", "answer"] = "full") -> RewardFn:
    """Reward fn `(completions, prompt, **_)` scoring with a trained reward model `scorer(prompts, texts)`.

    `score_on="full"` judges the whole completion (harmlessness); `"answer"` judges only the final answer: the
    `<answer>` content, else the text after `</think>` (helpfulness judges the summary, DeepSeek-R1 §2.3.4).
    """
    if score_on not in ("full", "answer"):
        raise ValueError(f"score_on must be 'full' or 'answer', got {score_on!r}")

    def reward(completions: list[str], prompt: list[Any], **_: Any) -> list[float]:
        texts = completions if score_on == "full" else [_final_text(c) for c in completions]
        scores = scorer(list(prompt), list(texts))  # a chat prompt reaches the reward model's template whole
        if len(scores) != len(completions):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(completions)} completions")
        return [float(s) for s in scores]

    return reward


def routed_reward(route_column: str, routes: dict[str, RewardFn]) -> RewardFn:
    """Reward fn sending each sample to `routes[columns[route_column][i]]`: each route's fn is called once on its
    sub-batch (list columns of batch length are sliced alike) and the results are scattered back in order."""

    def reward(completions: list[str], **columns: Any) -> list[float]:
        if route_column not in columns:
            raise KeyError(f"routed reward needs column {route_column!r}; got {sorted(columns)}")
        groups: dict[str, list[int]] = {}
        for i, value in enumerate(columns[route_column]):
            if value not in routes:
                raise KeyError(f"unknown {route_column} {value!r}; allowed routes: {sorted(routes)}")
            groups.setdefault(value, []).append(i)
        n = len(completions)
        rewards = [0.0] * n
        for value, indices in groups.items():
            sub_columns = {k: [v[i] for i in indices] if isinstance(v, list) and len(v) == n else v
                           for k, v in columns.items()}
            values = routes[value]([completions[i] for i in indices], **sub_columns)
            if len(values) != len(indices):
                raise ValueError(f"route {value!r} returned {len(values)} rewards for {len(indices)} samples")
            for i, v in zip(indices, values):
                rewards[i] = v  # as the route returned it: the caller checks every value
        return rewards

    return reward


# --- by name ----------------------------------------------------------------------------------------------------

def reward_fn(name: str) -> RewardFn:
    """The registered reward `name`, or a user's own reward function named by import path (`my_rewards:brevity`)."""
    try:
        return REWARDS.load(name)
    except ValueError as e:
        raise RewardConfigError(str(e)) from None


def build_reward(name: str, **params: Any) -> RewardFn:
    """The reward `name` (see `reward_fn`) with its keyword-only parameters bound (e.g. `overlong`: max_length, buffer,
    penalty). A parametrised reward is smoke-called on an empty batch so bad values fail here, not mid-training.

    Raises RewardConfigError (a KeyError and a ValueError) naming the unknown reward or parameter and the allowed
    ones; ValueError for bad parameter values.
    """
    fn = reward_fn(name)
    if not params:
        return fn
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RewardConfigError(f"reward {name!r} has no parameter(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(allowed) or 'none'}")
    reward = functools.partial(fn, **params)
    reward([])
    return reward
