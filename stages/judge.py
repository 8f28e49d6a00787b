"""LLM-as-judge reward: a model is asked a templated question about each completion and its reply is parsed for a
bounded score (reward = score / max_score, in [0, 1]).

The judge is a model from the pipeline (the grpo stage's `judge` input, greedy, `max_new_tokens` bounded) or a served
OpenAI-compatible one (`url`: POST {url}/v1/completions, `timeout_s`). Completions are untrusted model output, and so
are the judge's replies: the template is filled by one pass of plain replacement (never `str.format`, so a
completion holding "{prompt}" stays as written), the completion is cut to `max_completion_chars`, a reply is read up
to `MAX_REPLY_CHARS` characters by one bounded regex (no nested quantifiers) and never evaluated. A reply with no
valid score, a failed or late request, earns 0.0 and is counted (`JudgeReward.unparsed`), never raised.

Torch-free: the kind declarations import `JudgeParams`; the pipeline-model back end lives with the stage
(stages/runs/grpo.py: `model_judge`).
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from pydantic import Field, PositiveInt, field_validator

from stages.chat import prompt_text
from stages.kinds import StageParams

JUDGE_REWARD = "judge"  # the reward scored by the judge (the `judge` input or `judge.url`)
DEFAULT_TEMPLATE = ("Rate the response to the question from 0 (wrong or useless) to {max_score} (correct and "
                    "helpful). Reply as 'Score: N'.\nQuestion: {prompt}\nResponse: {completion}\nScore:")
MAX_REPLY_CHARS = 1000  # a judge's reply is read up to here
MAX_DIGITS = 6  # a number with more digits (either side of the point) is no score
MAX_REPLY_BYTES = 16384  # a served judge's answer may hold this many bytes per question
_PLACEHOLDER = re.compile(r"\{(prompt|completion|max_score)\}")
_MARKER = re.compile(r"score\s*:", re.IGNORECASE)
# a number not glued to a letter, digit or point before it: sign, whole part, decimal part
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+)(?:\.(\d+))?", re.ASCII)

Ask = Callable[[list[str]], list[str | None]]  # judge questions -> the judge's replies (None: no reply)


class JudgeParams(StageParams):
    """The `judge` reward (selected by naming `judge` in `rewards`)."""

    template: str = DEFAULT_TEMPLATE  # the question; {prompt}, {completion}, {max_score} are replaced (one pass)
    max_score: PositiveInt = Field(10, le=10 ** MAX_DIGITS - 1)  # the top of the scale: reward = score / max_score
    max_new_tokens: PositiveInt = 8  # reply budget: the judge model's greedy tokens, the served model's max_tokens
    max_completion_chars: PositiveInt = 2000  # the completion shown to the judge is cut to its first this many chars
    url: str | None = None  # a served OpenAI-compatible judge (POST {url}/v1/completions); None: the `judge` input
    model: str | None = None  # served: the model named in the request; None: the server's default
    timeout_s: float = Field(30.0, gt=0)  # served: a request still unanswered after this counts as unparsed

    @field_validator("template")
    @classmethod
    def shows_the_completion(cls, template: str) -> str:
        if "{completion}" not in template:
            raise ValueError("the judge's template must contain {completion} (what it judges)")
        return template

    @field_validator("url")
    @classmethod
    def http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
        return url


def judge_question(template: str, prompt: str, completion: str, max_score: int, max_completion_chars: int) -> str:
    """The template with {prompt}, {completion} (cut to its first `max_completion_chars` characters) and
    {max_score} replaced in one pass over the template: text put in is never scanned again."""
    values = {"prompt": prompt, "completion": completion[:max_completion_chars], "max_score": str(max_score)}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def parse_score(text: str, max_score: int) -> float | None:
    """The score in a judge's reply, or None.

    Only the first `MAX_REPLY_CHARS` characters are read. If they contain the marker "score:" (any case, spaces
    allowed before the colon), reading starts after its first occurrence, else at the start. The score is the first
    number from there — ASCII digits, an optional leading '-' and an optional decimal part, not glued to a letter,
    digit or point before it — if that number is a whole number in [0, max_score] with at most `MAX_DIGITS` digits
    either side of the point ("7", "7.0"); otherwise (negative, fractional, above max_score, too long, or no number
    at all) None. Later numbers are never tried: "Score: 7/10" is 7, "Score: 11 or 5" None for max_score 10.
    """
    text = text[:MAX_REPLY_CHARS]
    marker = _MARKER.search(text)
    number = _NUMBER.search(text, marker.end() if marker else 0)
    if number is None:
        return None
    sign, whole, fraction = number.group(1), number.group(2), number.group(3) or ""
    if sign or len(whole) > MAX_DIGITS or len(fraction) > MAX_DIGITS or fraction.strip("0"):
        return None
    value = int(whole)
    return float(value) if value <= max_score else None


class JudgeReward:
    """Reward fn `(completions, prompt, **_)`: score / max_score of the judge's reply to each completion's question,
    0.0 for a reply with no valid score (or none), which `unparsed` counts."""

    def __init__(self, ask: Ask, settings: JudgeParams):
        self.ask, self.settings, self.unparsed = ask, settings, 0

    def __call__(self, completions: list[str], prompt: list[Any], **_: Any) -> list[float]:
        s = self.settings
        questions = [judge_question(s.template, prompt_text(q), c, s.max_score, s.max_completion_chars)
                     for q, c in zip(prompt, completions)]
        replies = self.ask(questions) if questions else []
        scores = [None if reply is None else parse_score(reply, s.max_score) for reply in replies]
        self.unparsed += scores.count(None)
        return [0.0 if score is None else score / s.max_score for score in scores]

    def take_unparsed(self) -> int:
        """Unparsed replies since the last call."""
        count, self.unparsed = self.unparsed, 0
        return count


def post_json(url: str, payload: dict[str, Any], timeout_s: float, max_bytes: int) -> Any:
    """POST `payload` as JSON; the JSON answer. Every socket wait is bounded by `timeout_s`, the answer is read in
    pieces until `timeout_s` after the request (then TimeoutError) or `max_bytes` (then ValueError)."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"content-type": "application/json"})
    body = bytearray()
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        while piece := answer.read1(65536):
            body += piece
            if len(body) > max_bytes:
                raise ValueError(f"an answer over {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no whole answer within {timeout_s} s")
    return json.loads(body)


def served_judge(settings: JudgeParams) -> Ask:
    """Ask a served OpenAI-compatible model: one POST {url}/v1/completions per call with every question (greedy,
    `max_new_tokens`). A failed request (refused, late, an HTTP error, a malformed answer) is said on stderr and
    gives no replies; it never raises."""
    url = f"{settings.url.rstrip('/')}/v1/completions"

    def ask(questions: list[str]) -> list[str | None]:
        payload = {"prompt": questions, "max_tokens": settings.max_new_tokens, "temperature": 0.0,
                   **({"model": settings.model} if settings.model else {})}
        try:
            answer = post_json(url, payload, settings.timeout_s, MAX_REPLY_BYTES * len(questions))
            texts = {choice["index"]: choice["text"] for choice in answer["choices"]}
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            print(f"judge {url}: {type(e).__name__}: {str(e)[:200]}; {len(questions)} replies count as unparsed",
                  file=sys.stderr, flush=True)
            return [None] * len(questions)
        return [text if isinstance(text, str) else None for text in (texts.get(i) for i in range(len(questions)))]

    return ask
