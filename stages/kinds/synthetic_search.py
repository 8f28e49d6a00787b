"""Synthetic Search-R1 data for the embedded default (see `stages.search_task`): a world of invented countries whose
facts are corpus passages (what `bm25_index` indexes), questions whose answers are only in the corpus, cold-start
traces that call the search tool, and a pretraining corpus that teaches the format without the questions' facts.

Countries are split three ways: "known" ones (asked in the solved traces of pretraining and the cold start; their
facts appear only inside those traces' `<information>` blocks, each country in a few traces, so a trace is solved by
copying from the retrieved passage, not from memory), RL ones (asked in `prompts`) and held-out ones (asked in
`eval`). The facts of RL and held-out countries are in the corpus alone; pretraining only names them ("zorblax is a
country .") and each value ("quenta is a capital .") apart, so without a search the model can only guess among the
`values` of the attribute asked. A real pipeline replaces this stage with datasets (e.g. NQ/HotpotQA questions and a
Wikipedia corpus).
"""

from __future__ import annotations

import random

from pydantic import PositiveInt

from stages import search_task as task
from stages.context import StageContext
from stages.data import write_jsonl
from stages.kinds import Input, StageParams
from stages.reasoning_task import chat_document
from stages.retrieval import NO_MATCH, NO_QUERY


class Params(StageParams):
    entities: int = 3200  # invented countries in the world (one corpus passage each)
    attributes: int = 3  # facts per country (of capital, founder, river, animal, mountain, language)
    values: int = 20  # invented values per attribute, shared by countries (a blind guess is right 1/values)
    known_entities: int = 3000  # countries asked in solved traces (many, so that copying beats memorising)
    eval_entities: int = 50  # countries asked only in eval (the rest are asked in RL prompts)
    rl_prompts: int = 1000  # questions about RL countries (drawn with replacement from their facts)
    eval_prompts: int = 100  # held-out questions about eval countries (distinct facts)
    cold_start_traces: int = 300  # solved questions about known countries, calling the search tool
    trace_passages: PositiveInt = 3  # passages in a trace's information block: the gold one, then others (search's top_k)
    pretrain_documents: int = 4000  # solved questions about known countries (plus a line per country and value)


INPUTS: dict[str, Input] = {}
OUTPUTS = {
    "corpus": "corpus.jsonl",  # {id, text}: one passage per country, what the search tool retrieves
    "pretrain": "pretrain.jsonl",  # {text}
    "prompts": "prompts.jsonl",  # {prompt, answer, entity, attribute}: RL questions
    "eval": "eval.jsonl",  # held-out questions, same columns, about countries never asked elsewhere
    "sft": "sft.jsonl",  # {prompt, response, answer}: cold-start traces
    "vocab": "vocab.jsonl",  # {text}: every word of the task (eval names and answers included) for the tokenizer
}
KEY_METRICS = ("corpus_passages", "rl_prompts", "eval_prompts")  # `rl4llm compare` shows these


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    if p.known_entities + p.eval_entities >= p.entities:
        raise ValueError(f"entities ({p.entities}) must exceed known_entities + eval_entities "
                         f"({p.known_entities + p.eval_entities}): the rest are the RL countries")
    rng = random.Random(ctx.seed)
    world = task.make_world(rng, p.entities, p.attributes, p.values)
    known, held_out, rl = (world[:p.known_entities], world[p.known_entities:p.known_entities + p.eval_entities],
                           world[p.known_entities + p.eval_entities:])
    eval_facts = [q for e in held_out for q in task.questions(e)]
    if p.eval_prompts > len(eval_facts):
        raise ValueError(f"eval_prompts ({p.eval_prompts}) exceeds the {len(eval_facts)} facts of eval_entities")
    by_name = {e.name: e for e in world}
    rl_facts, known_facts = [q for e in rl for q in task.questions(e)], [q for e in known for q in task.questions(e)]

    def solved(row: dict) -> dict:
        entity = by_name[row["entity"]]
        others = task.distractors(rng, known, entity, row["attribute"], p.trace_passages - 1)
        return {"prompt": row["prompt"], "response": task.trace(entity, row["attribute"], others),
                "answer": row["answer"]}

    corpus = [{"id": f"p{i}", "text": task.passage(e)} for i, e in enumerate(world)]
    pretrain = [{"text": task.existence(e)} for e in world] + [{"text": t} for t in task.value_sentences(world)]
    for _ in range(p.pretrain_documents):
        row = solved(rng.choice(known_facts))
        pretrain.append({"text": chat_document(row["prompt"], row["response"])})
    rng.shuffle(pretrain)
    prompts = [rng.choice(rl_facts) for _ in range(p.rl_prompts)]
    eval_rows = rng.sample(eval_facts, p.eval_prompts)
    sft = [solved(rng.choice(known_facts)) for _ in range(p.cold_start_traces)]
    example = solved(task.questions(world[0])[0])  # the question and trace layout's words
    vocab = [{"text": r["text"]} for r in corpus] + [{"text": f"{example['prompt']} {example['response']}"},
                                                     {"text": f"{NO_QUERY} {NO_MATCH}"}]  # the search tool's notices

    write_jsonl(corpus, ctx.outputs["corpus"])
    write_jsonl(pretrain, ctx.outputs["pretrain"])
    write_jsonl(prompts, ctx.outputs["prompts"])
    write_jsonl(eval_rows, ctx.outputs["eval"])
    write_jsonl(sft, ctx.outputs["sft"])
    write_jsonl(vocab, ctx.outputs["vocab"])
    return {"corpus_passages": len(corpus), "pretrain_documents": len(pretrain), "rl_prompts": len(prompts),
            "eval_prompts": len(eval_rows), "cold_start_traces": len(sft)}
