"""Import a model: load the source (a GGUF file, a `save_pretrained` directory or a Hub id) and save it as an
ordinary `save_pretrained` directory with its tokenizer.

A GGUF file is dequantised by transformers' GGUF loader (the `gguf` package) into `dtype`; the loaded model still
carries the GGUF "quantisation" marker that makes `save_pretrained` refuse it, so the marker is removed (the weights
are plain tensors by then). A Hub id is read from the local Hugging Face cache when there, else downloaded.

Params, inputs and outputs: stages/kinds/import_model.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stages.context import StageContext
from stages.kinds.import_model import Params
from stages.models import load_policy, resolve_dtype
from stages.params import ModelParams

GGUF_SUFFIX = ".gguf"
HUB_TIMEOUT_S = 10  # the look at the Hub before a download


def run(ctx: StageContext) -> dict[str, float]:
    p: Params = ctx.params
    source = ctx.path("source")
    started = time.perf_counter()
    print(f"[{ctx.label}] importing {source} as {p.dtype}", flush=True)
    if source.endswith(GGUF_SUFFIX):
        model, tokenizer = from_gguf(Path(source), resolve_dtype(p.dtype))
    elif Path(source).exists():
        model = load_policy(source, ModelParams(dtype=p.dtype, trust_remote_code=p.trust_remote_code))
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=p.trust_remote_code)
    else:
        model, tokenizer = from_hub(ctx.label, source, p)
    loaded = time.perf_counter() - started
    if ctx.accelerator.is_main_process:
        model.save_pretrained(ctx.outputs["model"])
        tokenizer.save_pretrained(ctx.outputs["model"])
    seconds = time.perf_counter() - started
    print(f"[{ctx.label}] imported {source}: {model.num_parameters() / 1e6:.1f} M parameters, {model.dtype}, in "
          f"{seconds:.1f}s", flush=True)
    return {"parameters": float(model.num_parameters()), "vocab_size": float(len(tokenizer)), "load_seconds": loaded,
            "import_seconds": seconds}


def from_gguf(file: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file's model, dequantised into `dtype` and saveable, and its tokenizer (chat template included)."""
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    model.hf_quantizer.remove_quantization_config(model)  # plain tensors already: what made it unsaveable goes
    return model, tokenizer


def from_hub(label: str, repo_id: str, p: Params) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hub model at `p.revision`: from the local cache when it is there (no network), else downloaded after one
    quick look at the Hub (transformers would retry an unreachable Hub for most of a minute). Neither possible: a
    ValueError naming the stage, the key and what to do."""
    try:
        return load_hub_model(repo_id, p, local_files_only=True)
    except OSError:
        pass  # not cached
    try:
        huggingface_hub.model_info(repo_id, revision=p.revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # whatever keeps the Hub from answering: no network, offline mode, an unknown id or revision
        raise unavailable(label, repo_id, p, e) from None
    try:
        return load_hub_model(repo_id, p, local_files_only=False)
    except OSError as e:  # e.g. the repository holds no transformers checkpoint
        raise unavailable(label, repo_id, p, e) from None


def unavailable(label: str, repo_id: str, p: Params, error: Exception) -> ValueError:
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"{label}: inputs.source: Hub model '{repo_id}' (revision {p.revision or 'main'}) is neither "
                      f"in the local Hugging Face cache nor downloadable ({cause}); download it once where the Hub is "
                      "reachable, or give a local save_pretrained directory or .gguf file as the source")


def load_hub_model(repo_id: str, p: Params, local_files_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    options = dict(revision=p.revision, trust_remote_code=p.trust_remote_code, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, **options)
    return AutoModelForCausalLM.from_pretrained(repo_id, dtype=resolve_dtype(p.dtype), **options), tokenizer
