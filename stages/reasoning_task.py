"""The embedded reasoning task of the DeepSeek-R1 pipelines: two-step arithmetic word problems with integer answers.

Problems are written in two languages: "en" (Latin letters) and "el", a made-up language whose words are written in
Greek letters. A worked solution follows the R1-Zero template, every token whitespace-separated (the embedded
tokenizer is word-level):

    <think> 5 plus 3 is 8 , 8 minus 2 is 6 </think> <answer> 6 </answer>

The pretraining corpus holds such worked solutions written by a sloppy author: some chains of thought switch
language, some steps are miscalculated, some break the template or skip the reasoning, so that RL has something to
fix. General (non-reasoning) prompts — "name two fruits" — have a hidden gold score that plays the preference
labeler of the secondary RL round's reward model.
"""

from __future__ import annotations

import random
from typing import Any

from stages import rewards

LANGUAGES = ("en", "el")
# word of the problem text -> (en, el)
WORDS = {
    "has": ("has", "εχει"), "and": ("and", "και"), "how_many": ("how many", "ποσα"), "now": ("now", "τωρα"),
    "plus": ("plus", "συν"), "minus": ("minus", "μειον"), "is": ("is", "ειναι"),
}
NAMES = {"en": ("ana", "tom", "ben", "eva"), "el": ("αννα", "τομ", "μπεν", "εβα")}
ITEMS = {"en": ("apples", "coins", "books", "cats"), "el": ("μηλα", "κερματα", "βιβλια", "γατες")}
GAINS = {"en": ("gets", "finds"), "el": ("παιρνει", "βρισκει")}
LOSSES = {"en": ("loses", "gives"), "el": ("χανει", "δινει")}
FIRST, OTHERS = (1, 6), (1, 5)  # ranges of the starting amount and of the two changes
MAX_VALUE = 20  # every intermediate result and answer lies in [0, MAX_VALUE]

CATEGORIES = {
    "en": {"colors": ("red", "blue", "green", "pink"), "fruits": ("apple", "pear", "plum", "fig"),
           "animals": ("cat", "dog", "fox", "owl")},
    "el": {"χρωματα": ("κοκκινο", "μπλε", "πρασινο", "ροζ"), "φρουτα": ("μηλο", "αχλαδι", "δαμασκηνο", "συκο"),
           "ζωα": ("γατα", "σκυλος", "αλεπου", "κουκος")},
}
COUNTS = {"en": {"two": 2, "three": 3}, "el": {"δυο": 2, "τρια": 3}}
NAME_VERB = {"en": "name", "el": "πες"}
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
USER, ASSISTANT = "<|user|>", "<|assistant|>"  # the role tokens of `stages.models.CHAT_TEMPLATE`


def word(key: str, language: str) -> str:
    return WORDS[key][LANGUAGES.index(language)]


# --- reasoning problems -----------------------------------------------------------------------------------------


def make_problem(rng: random.Random, language: str) -> dict:
    """A row {prompt, answer, language, task, steps}: start with a, gain or lose b, then gain or lose c."""
    while True:
        a, b, c = rng.randint(*FIRST), rng.randint(*OTHERS), rng.randint(*OTHERS)
        ops = (rng.choice("+-"), rng.choice("+-"))
        middle = a + b if ops[0] == "+" else a - b
        answer = middle + c if ops[1] == "+" else middle - c
        if 0 <= middle <= MAX_VALUE and 0 <= answer <= MAX_VALUE:
            break
    name, item = rng.choice(NAMES[language]), rng.choice(ITEMS[language])
    verbs = [rng.choice(GAINS[language] if op == "+" else LOSSES[language]) for op in ops]
    prompt = (f"{name} {word('has', language)} {a} {item} . {name} {verbs[0]} {b} {word('and', language)} {verbs[1]} "
              f"{c} . {word('how_many', language)} {item} {word('now', language)} ?")
    steps = [(a, ops[0], b, middle), (middle, ops[1], c, answer)]
    return {"prompt": prompt, "answer": str(answer), "language": language, "task": "reasoning", "steps": steps}


def step_text(x: int, op: str, y: int, z: int, language: str) -> str:
    return f"{x} {word('plus' if op == '+' else 'minus', language)} {y} {word('is', language)} {z}"


def solution(steps: list[tuple[int, str, int, int]], language: str, rng: random.Random, wrong_rate: float = 0.0,
             format_error_rate: float = 0.0, mix_rate: float = 0.0) -> str:
    """A worked solution in the R1-Zero template, by an author who slips: each step is miscalculated with
    probability `wrong_rate / len(steps)` (the error carries on to the answer), the template is broken or the
    reasoning skipped with probability `format_error_rate`, and each step is written in the other language with
    probability `mix_rate`."""
    other = LANGUAGES[1 - LANGUAGES.index(language)]
    parts, carry = [], 0
    for i, (x, op, y, z) in enumerate(steps):
        x = x + carry if i else x
        z = z + carry
        if rng.random() < wrong_rate / len(steps):
            slip = rng.choice([-2, -1, 1, 2])
            z, carry = max(0, z + slip), carry + slip
        parts.append(step_text(x, op, y, z, other if rng.random() < mix_rate else language))
    thought, answer = " , ".join(parts), max(0, steps[-1][3] + carry)
    if rng.random() < format_error_rate:
        return rng.choice([
            f"{thought} <answer> {answer} </answer>",  # no think block
            f"<think> {thought} </think> {answer}",  # answer not tagged
            f"<answer> {answer + rng.choice([-1, 0, 0, 1])} </answer>",  # no reasoning: a guess
        ])
    return f"<think> {thought} </think> <answer> {answer} </answer>"


def _number(token: str) -> int | None:
    return int(token) if token.isascii() and token.isdigit() else None


def step_rewards(tokens: list[str]) -> list[tuple[int, float]]:
    """Rule-based process reward: (index of the step's last token, reward) for every step `x op y is z` of a
    response given as tokens (words, for the word-level tokenizer): 1.0 if z = x op y, else 0.0."""
    operators = dict.fromkeys(WORDS["plus"], 1) | dict.fromkeys(WORDS["minus"], -1)
    steps = []
    for i in range(3, len(tokens) - 1):
        if tokens[i] in WORDS["is"] and tokens[i - 2] in operators:
            x, y, z = _number(tokens[i - 3]), _number(tokens[i - 1]), _number(tokens[i + 1])
            correct = None not in (x, y, z) and x + operators[tokens[i - 2]] * y == z
            steps.append((i + 1, 1.0 if correct else 0.0))
    return steps


def chat_document(prompt: str, response: str) -> str:
    """A pretraining document laid out like the chat template the policy is prompted with, so the base model answers
    chat prompts (the R1-Zero template lives in the data, as on the web)."""
    return f"{USER} {prompt} {ASSISTANT} {response}"


# --- general (non-reasoning) prompts ----------------------------------------------------------------------------


def make_general_prompt(rng: random.Random, language: str) -> dict:
    """A row {prompt, answer: None, language, task}: "name two fruits" / its "el" version."""
    count, category = rng.choice(list(COUNTS[language])), rng.choice(list(CATEGORIES[language]))
    return {"prompt": f"{NAME_VERB[language]} {count} {category}", "answer": None, "language": language,
            "task": "general"}


def parse_general(prompt: str) -> tuple[int, tuple[str, ...]]:
    """(requested count, words of the requested category) of a general prompt; (0, ()) if it is not one."""
    words = prompt.split()
    for language in LANGUAGES:
        if len(words) == 3 and words[0] == NAME_VERB[language] and words[1] in COUNTS[language] \
                and words[2] in CATEGORIES[language]:
            return COUNTS[language][words[1]], CATEGORIES[language][words[2]]
    return 0, ()


def general_score(prompt: str, response: str) -> float:
    """Hidden quality in [0, 1] of a general response (R1 tags ignored): share of distinct on-topic words in the
    prompt's language × closeness of the word count to the request."""
    count, topic = parse_general(prompt)
    words = [w for w in response.split() if w not in TAGS]
    if not count or not words:
        return 0.0
    precision = len({w for w in words if w in topic}) / len(words)
    return precision * max(0.0, 1.0 - abs(len(words) - count) / count)


def general_demonstration(prompt: str, rng: random.Random, slip: float = 0.3) -> str:
    """A sloppy demonstration: the count is off, or a word is off-topic or in the other language, with prob. slip."""
    count, topic = parse_general(prompt)
    if rng.random() < slip:
        count = max(1, count + rng.choice([-1, 1]))
    every_word = [w for cats in CATEGORIES.values() for ws in cats.values() for w in ws]
    return " ".join(rng.choice(every_word) if rng.random() < slip / 2 else w
                    for w in rng.sample(topic, min(count, len(topic))))


def rank_general(prompt: str, responses: list[str]) -> list[int]:
    """Scripted labeler: dense ranks by `general_score` (0 = best); equal scores tie."""
    scores = [round(general_score(prompt, r), 4) for r in responses]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def evaluate(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """The `reasoning` evaluator, DeepSeek-R1's metrics on held-out problems (rows with `answer` and `language`):
    accuracy of the final answer, share following the `<think>…</think> <answer>…</answer>` template, language
    consistency of the chain of thought, and mean response length in words."""
    columns = {"answer": [r["answer"] for r in rows], "language": [r.get("language") for r in rows],
               "prompt": [r["prompt"] for r in rows]}
    metrics = {"accuracy": rewards.accuracy_reward(completions, **columns),
               "format_rate": rewards.format_reward(completions),
               "language_consistency": rewards.language_consistency_reward(completions, **columns),
               "mean_response_length": [len(c.split()) for c in completions]}
    return {name: sum(values) / len(values) for name, values in metrics.items()}
