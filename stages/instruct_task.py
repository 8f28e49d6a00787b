"""The embedded instruction-following task: "name three animals" → three distinct animal words.

It stands in for InstructGPT's human data. Demonstrations are written by a sloppy simulated human (wrong counts,
off-topic and repeated words); a hidden gold function measures true quality and plays the human labeler that ranks
K sampled responses. A plain-text corpus over the same words plays the pretraining distribution.
"""

from __future__ import annotations

import random
from typing import Any

from stages.chat import prompt_text

TOPICS = {
    "animals": "cat dog fox cow pig owl bee ant".split(),
    "colors": "red blue green pink gray gold black white".split(),
    "fruits": "apple pear plum lime fig kiwi mango peach".split(),
    "tools": "saw drill axe hammer wrench file rake hoe".split(),
    "places": "park farm lake hill town shop beach cave".split(),
}
COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5}
ALL_WORDS = [w for words in TOPICS.values() for w in words]
PRETRAIN_TEMPLATES = [
    "the {animals} is {colors} .",
    "a {animals} eats the {fruits} .",
    "we take the {tools} to the {places} .",
    "the {fruits} is {colors} and the {animals} is at the {places} .",
    "{topic} like {w1} and {w2} .",
    "my {tools} is {colors} .",
]


def make_prompt(rng: random.Random) -> str:
    return f"name {rng.choice(list(COUNTS))} {rng.choice(list(TOPICS))}"


def parse_prompt(prompt: str) -> tuple[int, str]:
    """(requested count, topic) of a prompt; (0, '') if it is not one of ours."""
    words = prompt.split()
    if len(words) != 3 or words[1] not in COUNTS or words[2] not in TOPICS:
        return 0, ""
    return COUNTS[words[1]], words[2]


def gold_score(prompt: str, response: str) -> float:
    """True quality in [0, 1]: share of distinct on-topic words × closeness of the word count to the request."""
    count, topic = parse_prompt(prompt)
    words = response.split()
    if not count or not words:
        return 0.0
    precision = len({w for w in words if w in TOPICS[topic]}) / len(words)
    count_match = max(0.0, 1.0 - abs(len(words) - count) / count)
    return precision * count_match


def demonstration(prompt: str, rng: random.Random, slip: float = 0.3) -> str:
    """A sloppy human demonstration: the count is off and words stray off-topic or repeat with probability `slip`."""
    count, topic = parse_prompt(prompt)
    if rng.random() < slip:
        count = max(1, count + rng.choice([-1, 1]))
    words = rng.sample(TOPICS[topic], min(count, len(TOPICS[topic])))
    for i in range(len(words)):
        roll = rng.random()
        if roll < slip / 2:
            words[i] = rng.choice(ALL_WORDS)
        elif roll < slip * 2 / 3 and i > 0:
            words[i] = words[i - 1]
    return " ".join(words)


def pretraining_sentence(rng: random.Random) -> str:
    topic = rng.choice(list(TOPICS))
    w1, w2 = rng.sample(TOPICS[topic], 2)
    fills = {name: rng.choice(words) for name, words in TOPICS.items()}
    return rng.choice(PRETRAIN_TEMPLATES).format(topic=topic, w1=w1, w2=w2, **fills)


def rank_by_gold(prompt: str, responses: list[str]) -> list[int]:
    """The scripted labeler: dense ranks of responses by gold score (0 = best); equal scores tie."""
    scores = [round(gold_score(prompt, r), 4) for r in responses]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def evaluate(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """The `instruct_gold` evaluator: mean hidden gold score, and mean response length in words."""
    scores = [gold_score(prompt_text(r["prompt"]), c) for r, c in zip(rows, completions)]
    return {"gold_score": sum(scores) / len(scores),
            "mean_response_length": sum(len(c.split()) for c in completions) / len(completions)}
