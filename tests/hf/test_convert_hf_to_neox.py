"""convert_hf_to_neox: the written checkpoint + YAML fine-tune in our trainer at the layout
asked for, and the first step's loss equals the transformers model's loss on that batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from convert_hf_to_neox import convert, parse_args
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from megatron.checkpoint import open_checkpoint
from megatron.config.loader import load_config
from megatron.config.validate import finalize
from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.tokenizers import build_tokenizer
from megatron.hf.adapters import to_hf
from megatron.hf.configs import UnmappedOption, config_from_hf
from megatron.hf.sepllm_attention import apply_sepllm
from megatron.training.setup import sample_counts
from tests.conftest import run_cli, step_losses, write_config


def _first_batch_loss(model: torch.nn.Module, cfg_paths: list[Path]) -> float:
    """Loss of the trainer's first global batch (samples 0..G-1 in micro-batches)."""
    cfg = load_config(cfg_paths)
    world = cfg.parallel.model_parallel_size * max(1, cfg.parallel.pipe_parallel_size)
    finalize(cfg, world, build_tokenizer(cfg.data).vocab_size)  # data-parallel size 1
    train, _, _ = build_train_valid_test_datasets(
        cfg.data, cfg.model.seq_length, cfg.training.seed, sample_counts(cfg)
    )
    d, losses = cfg.derived, []
    for b in range(d.grad_accum):
        rows = range(b * d.micro_batch, (b + 1) * d.micro_batch)
        tokens = torch.stack([torch.as_tensor(train[i]["text"], dtype=torch.long) for i in rows])
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits
        losses.append(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        )
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_converted_model_fine_tunes_at_tp2_from_the_hf_loss(
    exported: Path, shakespeare: tuple[str, str], tmp_path: Path
) -> None:
    out = convert(
        parse_args(["--input_dir", str(exported), "--output_dir", str(tmp_path / "neox"),
                    "--model_parallel_size", "2"])
    )  # fmt: skip
    finetune = out / "finetune.yml"
    keys = yaml.safe_load(finetune.read_text())
    assert keys["finetune"] is True and keys["load"] == str(out.resolve())
    assert keys["sepllm"]["mode"] == "sepllm" and keys["model_parallel_size"] == 2
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    data = write_config(
        tmp_path, shakespeare, "data.yml", train_iters=1, eval_interval=0, num_gpus=2
    )
    # the data / run keys only: the model comes from finetune.yml (keys may not repeat)
    run = {k: v for k, v in yaml.safe_load(data.read_text()).items() if k not in keys}
    data.write_text(yaml.safe_dump(run))
    run_cli(["deepy.py", "train.py", str(data), str(finetune)])
    got = step_losses(tmp_path / "data.yml.jsonl")[1]
    hf = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    apply_sepllm(hf)  # the exported sepllm entry's kept rule
    assert got == pytest.approx(_first_batch_loss(hf, [data, finetune]), abs=1e-4)


def test_round_trip_hf_to_ours_to_hf_is_identical(tmp_path: Path) -> None:
    """A transformers folder -> our checkpoint -> convert_neox's weights: identical tensors."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(str(tmp_path / "hf"))
    args = ["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "n")]
    out = convert(parse_args([*args, "--skip_tokenizer"]))  # the folder has none
    meta = json.loads((out / "global_step0" / "universal" / "meta.json").read_text())
    assert meta["full_state"] and (out / "global_step0" / "COMPLETE").is_file()
    assert "--skip_tokenizer" in (out / "finetune.yml").read_text()
    back = to_hf(open_checkpoint(out).state_dict(), config_from_hf(cfg))
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_unmapped_transformers_option_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    cfg = GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, hidden_act="gelu_new",
    )  # fmt: skip
    GPTNeoXForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UnmappedOption, match="hidden_act: gelu_new"):
        convert(
            parse_args(["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "n")])
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_round_trip_ours_to_hf_to_ours_is_identical(
    sepllm_ckpt: Path, exported: Path, tmp_path: Path
) -> None:
    """Our checkpoint -> convert_neox_to_hf -> convert_hf_to_neox: the trained tensors."""
    out = convert(parse_args(["--input_dir", str(exported), "--output_dir", str(tmp_path / "n")]))
    state = open_checkpoint(out).state_dict()
    original = open_checkpoint(sepllm_ckpt).state_dict()
    assert set(state) == set(original)
    for k, v in original.items():
        assert torch.equal(state[k], v), k
