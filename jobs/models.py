"""Load a causal LM from the hub or a local path, or build and train the tiny model.

``model.source``: ``hub`` (an HF id), ``path`` (a local directory), or ``build`` (a small
Llama built from ``model.build``, with a BPE tokenizer trained on a shipped text, trained
briefly, saved under the cache directory and reused). Every source ends in the same
``from_pretrained`` call, so the built model exercises the real loading code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from jobs import data
from jobs.cache import build_once, built_model_dir
from jobs.config import ModelConfig, TinyModelBuild

log = logging.getLogger(__name__)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """The path or hub id that ``from_pretrained`` loads, building the model if needed."""
    source, path = model_cfg.source, model_cfg.path
    if source == "build":
        return str(ensure_built(model_cfg.build))
    if not path:
        raise ValueError(f"model {model_cfg.name!r}: model.path is required for source={source!r}")
    if source == "path" and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model {model_cfg.name!r}: model.path={path!r} is not a directory")
    return str(Path(path).expanduser()) if source == "path" else path


def load_model(model_cfg: ModelConfig, device: torch.device):
    """(model in eval mode on ``device`` at ``model.dtype``, with ``model.outliers`` planted, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=TORCH_DTYPES[model_cfg.dtype], trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.outliers is not None:
        from jobs.scaling import plant_outliers
        plant_outliers(model, model_cfg.outliers)
    return model.to(device).eval(), tokenizer


def linear_layer_names(model_cfg: ModelConfig) -> list[str]:
    """The model's linear layers' names, in model order, without loading a weight: the architecture is
    built from its config on the meta device. Only the config is read (``config.json``, or the tiny
    model's build settings); a model that needs its own code (``trust_remote_code``) would run it here,
    so it is refused. Raises ValueError with the reason."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if model_cfg.trust_remote_code:
        raise ValueError("the layer names of a model with trust_remote_code=true come from its own code, which the "
                         "driver does not run")
    if model_cfg.source == "build":
        build = model_cfg.build
        built = built_model_dir(build) / "config.json"
        config = AutoConfig.from_pretrained(built.parent) if built.is_file() else LlamaConfig(
            vocab_size=build.vocab_size, hidden_size=build.hidden_size, intermediate_size=build.intermediate_size,
            num_hidden_layers=build.num_layers, num_attention_heads=build.num_heads,
            num_key_value_heads=build.num_heads, tie_word_embeddings=False)
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(model_cfg))
        except (OSError, ValueError) as e:
            raise ValueError(f"its config could not be read: {str(e).splitlines()[0][:200]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def ensure_built(build: TinyModelBuild) -> Path:
    """Build the tiny model once per machine; concurrent trials wait on a file lock."""
    out = built_model_dir(build)

    def make(tmp: Path) -> None:
        # A trial may be limited to one thread (Ray sets OMP_NUM_THREADS to its CPUs), but
        # every trial on this machine waits for this build: use all cores while it runs.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            _build_tiny_llama(build, tmp)
        finally:
            torch.set_num_threads(threads)

    build_once(out, "build.json", make)
    return out


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split(data.DOC_SEPARATOR), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _build_tiny_llama(build: TinyModelBuild, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    torch.manual_seed(build.seed)
    text = data.load_text(build.train_text, "train")
    tokenizer = train_tokenizer(text, build.vocab_size)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=build.hidden_size,
        intermediate_size=build.intermediate_size, num_hidden_layers=build.num_layers,
        num_attention_heads=build.num_heads, num_key_value_heads=build.num_heads,
        max_position_embeddings=build.max_seq_len, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    loss = _train(model, ids, build)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"build": dataclasses.asdict(build), "train_tokens": len(ids), "final_train_loss": loss,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    log.info("built tiny model %s: %s", out, info)


def _train(model, ids: torch.Tensor, build: TinyModelBuild) -> float:
    """Next-token training on random windows; AdamW, linear warm-up then cosine decay."""
    steps, seq, batch = build.train_steps, build.train_seq_len, build.train_batch_size
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=build.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    gen = torch.Generator().manual_seed(build.seed)
    model.train()
    ema = None
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen)
        window = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        # HF shifts the labels itself: labels == inputs trains next-token prediction.
        loss = model(input_ids=window, labels=window).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 50 == 0:
            log.info("tiny model: step %d/%d loss %.3f", step, steps, ema)
    model.eval()
    return round(ema, 4)
