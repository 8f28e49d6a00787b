"""Models and tokenizers: the embedded tiny default and the `from_pretrained` path real models take.

Every model a stage reads or writes is a `save_pretrained` directory, so the tiny default and `Qwen/Qwen2.5-0.5B`
go through the same loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from stages.context import StageContext
from stages.distributed import seed_sampling
from stages.params import LoraParams, ModelParams
from stages.text import position_ids

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
ROLE_TOKENS = ("<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} <eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REWARD_BIAS_KEY = "reward_normalization_bias"


def build_word_tokenizer(texts: list[str], out_dir: Path | str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level HF tokenizer over `texts`, with a chat template; saved to `out_dir` if given."""
    reserved = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]
    words = sorted({w for t in texts for w in t.split()} - set(reserved))
    vocab = {tok: i for i, tok in enumerate([*reserved, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_llama(vocab_size: int, hidden_size: int, layers: int, heads: int, max_positions: int,
                     pad_token_id: int, bos_token_id: int, eos_token_id: int) -> LlamaForCausalLM:
    """A small Llama-architecture causal LM built from a config (no download)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return LlamaForCausalLM(config)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"  # marks a LoRA adapter directory (PEFT), whose base it names


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """The `dtype` param: None is float32 on CPU and the checkpoint's own dtype ("auto") on GPU. (bfloat16 on this
    project's CPU, AVX-512 BF16, torch 2.13, 1 thread, SmolLM2-135M: generation 3.3x slower, 6.5x with LoRA; a LoRA
    training step more than 15x slower: float32 stays the CPU default.)"""
    if name is None:
        name = "auto" if torch.cuda.is_available() else "float32"
    return "auto" if name == "auto" else DTYPES[name]


def check_safetensors(path: str | Path) -> None:
    """Raise a ValueError naming any *.safetensors file of the model directory `path` that is truncated or corrupt:
    its 8-byte header length, JSON header and tensor extents must account for the file's size exactly."""
    for file in sorted(Path(path).glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(header_len) if 8 + header_len <= size else b""
        try:
            tensors = [t for key, t in json.loads(header).items() if key != "__metadata__"]
            end = 8 + header_len + max((int(t["data_offsets"][1]) for t in tensors), default=0)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise ValueError(f"{file}: truncated or corrupt safetensors file (unreadable header)") from None
        if end != size:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({size} bytes; its header says {end})")


def _load(auto_class, path: str, options: ModelParams | None, **config_overrides) -> PreTrainedModel:
    """`auto_class.from_pretrained` of a checkpoint or of a LoRA adapter directory (its adapters merged into the
    base it names), with the stage's dtype, attention implementation and trust_remote_code."""
    check_safetensors(path)
    adapter = Path(path, ADAPTER_CONFIG)
    if adapter.exists():
        from peft import PeftConfig, PeftModel

        base = _load(auto_class, json.loads(adapter.read_text())["base_model_name_or_path"], options,
                     **config_overrides)
        config = PeftConfig.from_pretrained(path)
        config.task_type = None  # any head: e.g. a reward model initialised from an SFT policy's adapters
        model = PeftModel.from_pretrained(base, path, config=config).merge_and_unload()
        model.config._name_or_path = path  # adapters trained on top of it name this directory as their base
        return model
    options = options or ModelParams()
    kwargs = {"dtype": resolve_dtype(options.dtype), "trust_remote_code": options.trust_remote_code}
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    if config_overrides:  # set as attributes: config classes drop unknown keyword arguments
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        kwargs["config"] = config
    return auto_class.from_pretrained(path, **kwargs)


def load_policy(path: str, options: ModelParams | None = None) -> PreTrainedModel:
    """A causal LM (policy, reference, teacher, student)."""
    return _load(AutoModelForCausalLM, path, options)


def load_scalar_head_model(path: str, pad_token_id: int, options: ModelParams | None = None) -> PreTrainedModel:
    """A causal LM checkpoint (or a saved reward model) with a scalar head on every token: reward and value models.

    Loaded as a token-classification model with one label, no bias and no dropout, so the head's weight is the
    `score.weight` of a sequence-classification reward model, and per-token values come out of the model's own
    forward (which is what DDP and FSDP wrap).
    """
    model = _load(AutoModelForTokenClassification, path, options, num_labels=1, classifier_dropout=0.0,
                  token_classification_bias=False)
    model.config.pad_token_id = pad_token_id
    return model


def with_lora(model: PreTrainedModel, lora: LoraParams) -> PreTrainedModel:
    """The model with fresh LoRA adapters, only they (and a scalar head) trainable; adapters off = the model."""
    from peft import LoraConfig, TaskType, get_peft_model

    scalar_head = hasattr(model, "score")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules,
                        task_type=TaskType.TOKEN_CLS if scalar_head else TaskType.CAUSAL_LM,
                        modules_to_save=["score"] if scalar_head else None)
    return get_peft_model(model, config)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
         state_dict: dict[str, torch.Tensor] | None = None, merge: bool = False) -> None:
    """`save_pretrained` of the model (or of `state_dict`, e.g. gathered from FSDP shards) and its tokenizer. A
    LoRA model is saved as its adapter directory (naming its base), or merged into full weights if `merge`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge and hasattr(model, "merge_and_unload"):
        model, state_dict = model.merge_and_unload(), None
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)


def reward_bias(path: str | Path) -> float:
    """The normalization bias stored with a reward model (0 if none was stored)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return float(config.get(REWARD_BIAS_KEY, 0.0))


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position of a `load_scalar_head_model` model: [B, T] (rewards / values)."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask)).logits.squeeze(-1).float()


def last_token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      bias: float = 0.0) -> torch.Tensor:
    """Scalar score of each sequence's last non-pad token, plus the stored normalization bias: [B].

    Works for left- and right-padded batches.
    """
    values = token_values(model, input_ids, attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * positions).argmax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1) + bias


def sampling_policy(ctx: StageContext, params: ModelParams) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The `policy` input and its tokenizer, on this rank's device, torch seeded for sampling (`seed_sampling`)."""
    model = load_policy(ctx.path("policy"), params).to(ctx.accelerator.device)
    seed_sampling(ctx.seed, ctx.accelerator)
    return model, load_tokenizer(ctx.path("policy"))
