"""Convert a transformers GPT-NeoX / Llama folder into a checkpoint our trainer fine-tunes from.

    python tools/ckpts/convert_hf_to_neox.py --input_dir hf/model --output_dir ckpts/model \
        [--model_parallel_size N] [--pipe_parallel_size P]

Writes `<output_dir>/global_step0/` holding the layout-independent copy the trainer reshards
at load time (`universal/state.pt` + `meta.json`, see megatron/training/universal.py), so the
same checkpoint fine-tunes at any TP x PP; `latest`; the tokenizer (`tokenizer/tokenizer.json`);
and `<output_dir>/finetune.yml` with the model keys (from `config_from_hf`, exact or refused
by name), the layout asked for, `finetune: true` and `load:`. Merge it with a data config:

    python deepy.py train.py finetune.yml my_data.yml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from atomic_dir import atomic_dir, refuse_existing

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import from_hf
from megatron.hf.configs import UnmappedOption, config_from_hf

TAG = "global_step0"
SEPLLM_SECTION = {f.name for f in dataclasses.fields(SepLLMConfig)}
# universal.saved_layout compares (TP, PP) with the run's; (0, 0) matches no real layout, so
# the trainer always takes the layout-independent copy (there are no DeepSpeed files).
ANY_LAYOUT = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_dir", required=True, help="a transformers model folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_parallel_size", type=int, default=1)
    p.add_argument("--pipe_parallel_size", type=int, default=1)
    p.add_argument("--seq_length", type=int, default=None, help="default: max_position_embeddings")
    return p.parse_args(argv)


def _load_hf(folder: str) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    config_from_hf(config)  # refuse before loading any weight
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    return model.config, state


def _tokenizer(folder: str, out: Path) -> Path | None:
    """The folder's tokenizer as a tokenizer.json our HFTokenizer (the data pipeline) reads."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None  # weights-only folder: the user brings a tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    (out / "tokenizer").mkdir()
    backend.save(str(out / "tokenizer" / "tokenizer.json"))
    return out / "tokenizer" / "tokenizer.json"


def _divisor(vocab: int, tp: int) -> int:
    """make_vocab_size_divisible_by that pads any tokenizer up to the HF embedding's rows."""
    if vocab % tp:
        raise UnmappedOption(f"vocab_size {vocab} does not split over model_parallel_size {tp}")
    return vocab // tp


def _finetune_yaml(
    m: ModelConfig, args: argparse.Namespace, vocab: int, tok: Path | None, sepllm: Any
) -> str:
    model = dataclasses.asdict(m)
    model["make_vocab_size_divisible_by"] = _divisor(vocab, args.model_parallel_size)
    final = Path(args.output_dir).resolve()
    keys: dict[str, Any] = {
        **model,
        "model_parallel_size": args.model_parallel_size,
        "pipe_parallel_size": args.pipe_parallel_size,
        "finetune": True,
        "load": str(final),
    }
    if sepllm:  # an exported SepLLM model keeps training with its kept set
        keys["sepllm"] = {k: v for k, v in sepllm.items() if k in SEPLLM_SECTION}
    if tok is not None:
        keys.update(tokenizer_type="HFTokenizer", vocab_file=str(final / "tokenizer" / tok.name))
    return yaml.safe_dump(keys, sort_keys=False)


def convert(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    refuse_existing(out)
    config, hf_state = _load_hf(args.input_dir)
    m = config_from_hf(config, args.seq_length)
    state = from_hf(hf_state, m)
    vocab = state["embedding.embed.weight"].shape[0]
    with atomic_dir(out) as tmp:
        step = tmp / TAG
        (step / "universal").mkdir(parents=True)
        torch.save({k: {"param": v} for k, v in state.items()}, step / "universal" / "state.pt")
        meta = {
            "iteration": 0,
            "model_parallel_size": ANY_LAYOUT,
            "pipe_parallel_size": ANY_LAYOUT,
            "full_state": True,
            "why_not": None,
            "source": f"convert_hf_to_neox from {args.input_dir}",
        }
        (step / "universal" / "meta.json").write_text(json.dumps(meta))
        tok = _tokenizer(args.input_dir, tmp)
        (tmp / "finetune.yml").write_text(
            _finetune_yaml(m, args, vocab, tok, getattr(config, "sepllm", None))
        )
        (step / "COMPLETE").write_text("0")
        (tmp / "latest").write_text(TAG)
    print(f"{args.input_dir} -> {out} (fine-tune with {out / 'finetune.yml'})")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        convert(parse_args(argv))
    except (UnmappedOption, FileExistsError, KeyError) as e:
        print(f"convert_hf_to_neox: refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
