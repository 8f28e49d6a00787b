"""The embedded task of the Search-R1 pipeline: questions about facts of a synthetic world that exist only in a
corpus, so the answer must be retrieved with the `search` tool.

The world is generated per seed (invented names, so no model can have memorised it): countries with a few
attributes each, every country's facts written as one corpus passage,

    zo bla ki is a country . the capital of zo bla ki is quenta . the river of zo bla ki is mirel .

and questions about one attribute of one country ("what is the capital of zo bla ki ?") with one-word answers. A
country's name is two or three syllables written as words: the embedded tokenizer is word-level, so a name is a
sequence of common tokens, and a model that learned to copy a name from the question into its query copies names
it has never seen (a name that were one token of its own would be a word seen once). A solved question is a
Search-R1 trajectory, every tag its own whitespace-separated word; the `<information>` block is what the environment
appended after the call, and the answer is read out of it in a last thought:

    <think> i need the capital of zo bla ki </think> <search> capital of zo bla ki </search>
    <information> zo bla ki is a country . the capital of zo bla ki is quenta . … </information>
    <think> the capital of zo bla ki is quenta </think> <answer> quenta </answer>

Rewards read untrusted text with linear scans only (one regex without nested quantifiers, no eval).
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.rewards import tagged_answer

ATTRIBUTES = ("capital", "founder", "river", "animal", "mountain", "language")
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "qu", "st", "th", "zh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
CODAS = ("", "", "", "n", "r", "x", "l", "s")
TEMPLATE_WORDS = frozenset("what is the of a country its i need".split()) | frozenset(ATTRIBUTES)
TAGS = ("think", "search", "information", "answer")
FORMAT_PENALTY = -1.0  # tool_format_reward of a malformed trajectory
_TAG = re.compile(r"<(/?)(think|search|information|answer)>")


# --- the synthetic world ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]  # attribute -> value, in the order the passage states them


SYLLABLES = tuple(onset + vowel for onset in ONSETS for vowel in VOWELS if onset + vowel not in TEMPLATE_WORDS)


def invented_word(rng: random.Random) -> str:
    """A pronounceable made-up word of two or three syllables and a coda ("zorblax", "quenta")."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) + rng.choice(CODAS)


def invented_name(rng: random.Random) -> str:
    """A made-up name of two or three syllables, each a word ("zo bla ki")."""
    return " ".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def invented(rng: random.Random, n: int, taken: set[str], make: Callable[[random.Random], str]) -> list[str]:
    """`n` distinct strings from `make`, none in `taken` nor a template word (`taken` is updated)."""
    made: list[str] = []
    while len(made) < n:
        text = make(rng)
        if text not in taken and text not in TEMPLATE_WORDS:
            taken.add(text)
            made.append(text)
    return made


def make_world(rng: random.Random, entities: int, attributes: int, values: int) -> list[Entity]:
    """`entities` countries, each with `attributes` of ATTRIBUTES whose values come from a pool of `values` invented
    words per attribute (shared by countries, so a value word also occurs in facts the model may see elsewhere)."""
    if not 1 <= attributes <= len(ATTRIBUTES):
        raise ValueError(f"attributes must be in 1..{len(ATTRIBUTES)}, got {attributes}")
    taken: set[str] = set()
    names = invented(rng, entities, taken, invented_name)
    pools = {attribute: invented(rng, values, taken, invented_word) for attribute in ATTRIBUTES}
    return [Entity(name, {a: rng.choice(pools[a]) for a in rng.sample(ATTRIBUTES, attributes)}) for name in names]


def passage(entity: Entity) -> str:
    """The corpus passage stating every fact of `entity`, each sentence naming the country (as encyclopedia text
    does: the sentence that answers a question repeats its words)."""
    return " ".join([f"{entity.name} is a country ."] +
                    [f"the {a} of {entity.name} is {v} ." for a, v in entity.facts.items()])


def existence(entity: Entity) -> str:
    """A sentence naming the country without stating any fact (so its name is in the pretraining text)."""
    return f"{entity.name} is a country ."


def value_sentences(world: list[Entity]) -> list[str]:
    """A sentence per attribute value used in `world` ("quenta is a capital ."), linking it to no country (so every
    answer word is in the pretraining text while the facts are not)."""
    values = sorted({(a, v) for e in world for a, v in e.facts.items()})
    return [f"{v} is a {a} ." for a, v in values]


def question(entity: Entity, attribute: str) -> dict[str, str]:
    """A row {prompt, answer, entity, attribute}."""
    return {"prompt": f"what is the {attribute} of {entity.name} ?", "answer": entity.facts[attribute],
            "entity": entity.name, "attribute": attribute}


def questions(entity: Entity) -> list[dict[str, str]]:
    return [question(entity, attribute) for attribute in entity.facts]


def trace(entity: Entity, attribute: str, others: list[Entity] = ()) -> str:
    """The solved question as a Search-R1 trajectory; its `<information>` block is what the environment appends
    after a search that ranks the gold passage first: that passage, then those of `others` (the search tool shows
    its top-k)."""
    query = f"{attribute} of {entity.name}"
    found = " ".join(passage(e) for e in [entity, *others])
    answer = entity.facts[attribute]
    return (f"<think> i need the {query} </think> <search> {query} </search> <information> {found} </information> "
            f"<think> the {query} is {answer} </think> <answer> {answer} </answer>")


def distractors(rng: random.Random, world: list[Entity], entity: Entity, attribute: str, n: int) -> list[Entity]:
    """`n` other countries that state `attribute` (what BM25 ranks after the gold passage: they share the query's
    attribute word), drawn at random; fewer if the world has fewer."""
    candidates = [e for e in world if e is not entity and attribute in e.facts]
    return rng.sample(candidates, min(n, len(candidates)))


# --- rewards and the evaluator ----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lowercased, punctuation (Unicode category P*) removed, whitespace collapsed: SQuAD-style exact match."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(kept.split())


@dataclass(frozen=True)
class Trajectory:
    searches: int  # <search> blocks
    error: str | None  # why the trajectory is malformed; None if well formed
    own_words: int  # words outside <information> blocks (those the model wrote)


def parse_trajectory(text: str) -> Trajectory:
    """Check a trajectory's tags in one linear scan. Well formed means: tags are never nested and every opening tag
    is closed by its own closing tag; every `<search>` query is non-empty; an `<information>` block comes only right
    after a `</search>` (where the environment appends it; its content is not scanned, so tool output may hold
    anything but `</information>`); there is exactly one `<answer>` block and nothing but whitespace follows it.
    The first violation found is the error; the counts cover the whole text either way."""
    errors: list[str] = []
    searches, own_words, outside_start, search_end, answer_end = 0, 0, 0, -1, -1
    open_tag, content_start, last_closed = None, 0, None
    for match in _TAG.finditer(text):
        closing, tag = match.group(1) == "/", match.group(2)
        if open_tag == "information" and not (closing and tag == "information"):
            continue  # tool output: not the model's tags
        if not closing:
            if open_tag is not None:
                errors.append(f"<{tag}> inside <{open_tag}>")
            if tag == "information" and (last_closed != "search" or text[search_end:match.start()].strip()):
                errors.append("<information> not right after a search")
            if tag == "answer" and answer_end != -1:
                errors.append("more than one <answer>")
            if tag == "information":
                own_words += len(text[outside_start:match.start()].split())
            open_tag, content_start = tag, match.end()
            continue
        if open_tag != tag:
            errors.append(f"</{tag}> without <{tag}>")
            continue
        if tag == "search":
            searches += 1
            search_end = match.end()
            if not text[content_start:match.start()].strip():
                errors.append("empty search query")
        elif tag == "answer":
            answer_end = match.end()
        elif tag == "information":
            outside_start = match.end()
        open_tag, last_closed = None, tag
    own_words += len(text[outside_start:content_start if open_tag == "information" else len(text)].split())
    if open_tag is not None:
        errors.append(f"<{open_tag}> not closed")
    elif answer_end == -1:
        errors.append("no <answer>")
    elif text[answer_end:].strip():
        errors.append("text after </answer>")
    return Trajectory(searches, errors[0] if errors else None, own_words)


def exact_match_reward(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the content of the last `<answer>…</answer>`, normalized (`normalize`), equals the normalized gold
    answer; else 0.0 (no answer tags: 0.0)."""
    rewards = []
    for completion, gold in zip(completions, answer):
        predicted = tagged_answer(completion)
        rewards.append(float(predicted is not None and normalize(predicted) == normalize(str(gold))))
    return rewards


def tool_format_reward(completions: list[str], **_: Any) -> list[float]:
    """0.0 for a well-formed trajectory (`parse_trajectory`; the environment's `<information>` blocks are part of
    it and allowed after each search), FORMAT_PENALTY (-1.0) for a malformed one: an unclosed or nested tag, an
    empty query, an information block the model wrote itself, no answer, several answers, or text after it."""
    return [0.0 if parse_trajectory(c).error is None else FORMAT_PENALTY for c in completions]


def evaluate(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """The `search` evaluator on held-out questions (rows with `answer`): accuracy (exact match of the last answer),
    format_rate (well-formed trajectories), search_rate (share with at least one search call), mean_searches, and
    mean_response_length (words the model wrote, i.e. outside `<information>` blocks)."""
    parsed = [parse_trajectory(c) for c in completions]
    metrics = {"accuracy": exact_match_reward(completions, [r["answer"] for r in rows]),
               "format_rate": [float(t.error is None) for t in parsed],
               "search_rate": [float(t.searches > 0) for t in parsed],
               "mean_searches": [float(t.searches) for t in parsed],
               "mean_response_length": [float(t.own_words) for t in parsed]}
    return {name: sum(values) / len(values) for name, values in metrics.items()}
