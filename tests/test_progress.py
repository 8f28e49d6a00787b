"""Progress lines: throttled to one per interval, counting items and tokens, only on the main process."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stages import progress
from stages.evaluation import evaluate_policy
from stages.models import load_policy, load_tokenizer, with_lora
from stages.params import LoraParams
from stages.progress import Progress
from stages.text import encode_prompt, logits, pad, sample


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_with_counts_and_tokens_per_second(capsys):
    clock = Clock()
    bar = Progress("sampling", 128, interval=30, clock=clock)
    clock.now += 10
    bar.advance(32, tokens=400)
    assert capsys.readouterr().err == ""  # the first line only after the interval
    clock.now += 21
    bar.advance(32, tokens=840)
    assert capsys.readouterr().err == "sampling 64/128 samples, 40 tokens/s, 31s elapsed\n"
    clock.now += 29
    bar.advance(1)
    assert capsys.readouterr().err == ""  # 29 s since the last line
    clock.now += 1
    bar.advance(0)
    assert capsys.readouterr().err == "sampling 65/128 samples, 20 tokens/s, 61s elapsed\n"


def test_no_tokens_no_speed(capsys):
    clock = Clock()
    bar = Progress("scoring", 10, unit="rows", interval=5, clock=clock)
    clock.now += 5
    bar.advance(3)
    assert capsys.readouterr().err == "scoring 3/10 rows, 5s elapsed\n"


def test_the_ticker_speaks_while_one_call_outlasts_the_interval(capsys):
    with Progress("sampling", 4, interval=0.05) as bar:
        bar.advance(1, tokens=10)
        capsys.readouterr()
        time.sleep(0.3)  # one long forward: no advance meanwhile
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("sampling 1/4 samples") for line in lines)
    assert not any(t.name == "rl4llm-progress" for t in threading.enumerate())  # stopped with the loop


def test_interval_from_the_environment_and_only_the_main_process_prints(capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    Progress("sampling", 2).advance(1)
    assert capsys.readouterr().err.startswith("sampling 1/2 samples")
    monkeypatch.setenv("RANK", "1")
    Progress("sampling", 2).advance(1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["x", ""])
def test_a_bad_interval_setting_is_refused(monkeypatch, bad):
    monkeypatch.setenv(progress.INTERVAL_ENV, bad)
    with pytest.raises(ValueError):
        Progress("sampling", 2)


@pytest.fixture
def tiny(tiny_model_dir):
    """The tiny policy, its checkpoint's generation_config asking for top-k, top-p, min-p and a repetition penalty."""
    model, tokenizer = load_policy(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.generation_config.update(top_k=3, top_p=0.5, min_p=0.9, repetition_penalty=5.0, do_sample=True)
    return model, tokenizer


def logits_processors(generating: torch.nn.Module, monkeypatch) -> list[list[str]]:
    """The logits processors each `generate` of `generating` builds, by class name."""
    built, build = [], generating._get_logits_processor

    def capture(*args, **kwargs):
        processors = build(*args, **kwargs)
        built.append([type(p).__name__ for p in processors])
        return processors

    monkeypatch.setattr(generating, "_get_logits_processor", capture)
    return built


@pytest.mark.parametrize("lora", [False, True])
def test_sampling_is_softmax_over_temperature_whatever_the_checkpoint_asks(tiny, monkeypatch, capsys, lora):
    model, tokenizer = tiny
    inner = model
    if lora:
        model = with_lora(model, LoraParams(r=2, alpha=4, target_modules="all-linear"))
    built = logits_processors(inner, monkeypatch)
    sample(model, tokenizer, ["name two animals"] * 2, 3, temperature=0.7)
    sample(model, tokenizer, ["name two animals"] * 2, 3, temperature=0)
    assert built == [["TemperatureLogitsWarper"], []]
    assert inner.generation_config.top_k == 3  # the checkpoint's own config is left as it was
    assert "may be ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True])
def test_a_sampled_token_is_drawn_from_softmax_of_logits_over_temperature(tiny, lora):
    """Also with trained LoRA adapters (merged for generation): the policy's own softmax, base weights restored."""
    model, tokenizer = tiny
    if lora:
        model = with_lora(model, LoraParams(r=2, alpha=4, target_modules="all-linear"))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    base = {name: p.detach().clone() for name, p in model.named_parameters() if "lora" not in name}
    prompts = ["name two animals", "name five tools", "name two colors", "name three fruits"] * 4
    torch.manual_seed(3)
    drawn = sample(model, tokenizer, prompts, 1, temperature=0.7).batch.response_ids[:, 0]
    ids, mask = pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "left")
    torch.manual_seed(3)
    expected = torch.multinomial(torch.softmax(logits(model, ids, mask)[:, -1] / 0.7, -1), 1)[:, 0]
    assert drawn.tolist() == expected.tolist()
    assert not getattr(model, "merged", False)
    for name, param in model.named_parameters():
        if name in base:
            torch.testing.assert_close(param, base[name], atol=1e-6, rtol=0)


def test_sampling_reports_samples_and_tokens_from_inside_generate(tiny, monkeypatch, capsys):
    model, tokenizer = tiny
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # a line at every decode step
    samples = sample(model, tokenizer, ["name two animals", "name five tools"] * 2, 5, batch_size=2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 * 5  # every decode step of each batch, and not only per batch
    assert all(line.startswith("sampling ") and "tokens/s" in line for line in lines)
    assert lines[-1].split(",")[0] == "sampling 4/4 samples"
    assert lines[4].split(",")[0].endswith("/4 samples") and int(lines[4].split()[1].split("/")[0]) <= 2
    generated = sum(samples.lengths)
    assert f"{generated} tokens" not in lines[-1]  # a rate, not a count


def test_evaluation_reports_as_evaluating(tiny, monkeypatch, capsys):
    model, tokenizer = tiny
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    evaluate_policy(model, tokenizer, [{"prompt": "name two animals"}], "instruct_gold", 3, samples_per_prompt=2)
    assert capsys.readouterr().err.splitlines()[-1].startswith("evaluating 2/2 samples, ")
