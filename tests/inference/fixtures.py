"""Tiny checkpoints on disk for the tool tests: one of ours (the trainer's layout) and the same
weights as a transformers folder (written through the adapters, as a converter would)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron.checkpoint import writer
from megatron.checkpoint.layout import model_states_file
from megatron.config.schema import DataConfig, ModelConfig, SepLLMConfig
from megatron.hf.adapters import family, hf_config, to_hf
from megatron.model.transformer import GPTModel

VOCAB = 512  # the char-level tokenizer's (UTF-8 bytes)
SPEC = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=64,
    rotary_pct=0.25,
    gpt_j_residual=True,
    no_weight_tying=True,
)
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer; " * 3


def write_checkpoint(root: Path, spec: dict | None = None, sep: SepLLMConfig | None = None) -> Path:
    """<root>/latest + global_step1/{config.yml, mp_rank_00_model_states.pt, COMPLETE}, as the
    trainer writes them at TP = PP = 1; returns root."""
    torch.manual_seed(0)
    m, sep = ModelConfig(**(spec or SPEC)), sep or SepLLMConfig()
    model = GPTModel(m, sep, VOCAB)
    step = root / "global_step1"
    step.mkdir(parents=True)
    data = DataConfig(tokenizer_type="CharLevelTokenizer")
    cfg = {
        "model": dataclasses.asdict(m),
        "sepllm": dataclasses.asdict(sep),
        "data": dataclasses.asdict(data),
    }
    writer.write_config(step, cfg, {})
    torch.save({"module": model.state_dict()}, step / model_states_file(0))
    writer.finish(root, step, 1)
    return root


def write_hf_folder(root: Path, spec: dict | None = None) -> Path:
    """The same weights as write_checkpoint, as a transformers folder (no tokenizer files)."""
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    m = ModelConfig(**(spec or SPEC))
    ours = GPTModel(m, SepLLMConfig(), VOCAB)
    cls = LlamaForCausalLM if family(m) == "llama" else GPTNeoXForCausalLM
    hf = cls(hf_config(m, VOCAB))
    hf.load_state_dict(to_hf(ours.state_dict(), m), strict=False)
    hf.save_pretrained(str(root))
    char_tokenizer().save_pretrained(str(root))
    return root


def char_tokenizer():  # -> PreTrainedTokenizerFast
    """A transformers tokenizer with the char-level tokenizer's ids for ASCII text (id = byte)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(1, 256)} | {"<|endoftext|>": 0}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
