"""convert_neox_to_hf on real checkpoints: stock transformers loads the folder offline and
gives our logits, tokens and greedy generations; every refusal leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from convert_neox_to_hf import convert, parse_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron.checkpoint import CheckpointRefused, open_checkpoint
from megatron.checkpoint.checksums import write_complete
from megatron.checkpoint.layout import COMPLETE
from megatron.checkpoint.safe_load import load_file
from megatron.config.schema import DataConfig, SepLLMConfig
from megatron.data.tokenizers import tokenizer_for_file
from megatron.hf.configs import UnmappedOption
from megatron.hf.export import PrecisionRefused
from megatron.hf.tokenizer import TokenizerRefused, write_tokenizer
from megatron.model.transformer import GPTModel

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def _ours_full(ckpt_dir: Path) -> tuple[GPTModel, object]:
    """Our model with the checkpoint's weights and full attention (what stock transformers
    runs without the sepllm attention implementation)."""
    ck = open_checkpoint(ckpt_dir)
    vocab = ck.state_dict()["embedding.embed.weight"].shape[0]
    model = GPTModel(ck.cfg.model, SepLLMConfig(), vocab).eval()
    model.load_state_dict(ck.state_dict())
    return model, ck


def _ids(tokenizer_file: str, n: int) -> torch.Tensor:
    return torch.tensor([tokenizer_for_file(tokenizer_file).tokenize(TEXT)[:n]])


def test_folder_loads_offline_and_matches_our_logits(sepllm_ckpt: Path, exported: Path) -> None:
    ours, ck = _ours_full(sepllm_ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    ids = _ids(ck.cfg.data.vocab_file, 64)
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    assert tok(TEXT, add_special_tokens=False)["input_ids"][:64] == ids[0].tolist()
    ours_tok = tokenizer_for_file(ck.cfg.data.vocab_file)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours_tok.eod and gen["pad_token_id"] == ours_tok.pad
    entry = json.loads((exported / "config.json").read_text())["sepllm"]
    sep = ck.cfg.sepllm
    assert entry["mode"] == "sepllm" and entry["separator_token_ids"] == sep.separator_token_ids
    assert (entry["init_tokens"], entry["local_window"]) == (sep.init_tokens, sep.local_window)
    assert entry["local_window_per_layer"] == [8, 64] and entry["pad_token_id"] == 1


def _greedy(model: GPTModel, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    return ids[0].tolist()


def test_greedy_generation_is_identical(sepllm_ckpt: Path, exported: Path) -> None:
    ours, ck = _ours_full(sepllm_ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    prompt = _ids(ck.cfg.data.vocab_file, 16)
    got = theirs.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert got[0].tolist() == _greedy(ours, prompt, 32)


def _refused(args: list[str], out: Path, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        convert(parse_args([*args, "--output_dir", str(out)]))
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _copy(ckpt: Path, tmp: Path) -> Path:
    step = ckpt / (ckpt / "latest").read_text().strip()
    shutil.copytree(step, tmp / step.name)
    return tmp / step.name


def _reseal(step: Path) -> None:
    """Checksums of the edited files, so the edit itself is what gets refused."""
    write_complete(step, COMPLETE, 2)


def test_incomplete_checkpoint_is_refused(sepllm_ckpt: Path, tmp_path: Path) -> None:
    step = _copy(sepllm_ckpt, tmp_path)
    (step / "COMPLETE").unlink()
    _refused(["--input_dir", str(step)], tmp_path / "out", CheckpointRefused, "no COMPLETE")


def test_another_architecture_is_refused_by_name(sepllm_ckpt: Path, tmp_path: Path) -> None:
    args = ["--input_dir", str(sepllm_ckpt), "--architecture", "llama"]
    _refused(args, tmp_path / "out", UnmappedOption, "--architecture llama")


def test_unmappable_config_is_refused_by_name(sepllm_ckpt: Path, tmp_path: Path) -> None:
    step = _copy(sepllm_ckpt, tmp_path)
    cfg = yaml.safe_load((step / "config.yml").read_text())
    cfg["model"]["pos_emb"] = "learned"
    (step / "config.yml").write_text(yaml.safe_dump(cfg))
    _reseal(step)
    _refused(["--input_dir", str(step)], tmp_path / "out", UnmappedOption, "pos_emb: learned")


def test_precision_that_overflows_is_refused(sepllm_ckpt: Path, tmp_path: Path) -> None:
    step = _copy(sepllm_ckpt, tmp_path)
    state = load_file(step / "universal" / "state.pt")
    state["blocks.0.mlp.up.bias"]["param"][0] = 1e6
    torch.save(state, step / "universal" / "state.pt")
    _reseal(step)
    args = ["--input_dir", str(step), "--precision", "fp16"]
    _refused(args, tmp_path / "out", PrecisionRefused, r"fp16: blocks\.0\.mlp\.up\.bias reaches")


def test_char_level_tokenizer_is_refused_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(TokenizerRefused, match="CharLevelTokenizer.*--skip_tokenizer"):
        write_tokenizer(DataConfig(tokenizer_type="CharLevelTokenizer"), tmp_path)


def _word_level(path: Path, entries: int) -> Path:
    """A tokenizer.json of `entries` ids (another tokenizer than the model trained with)."""
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0} | {f"w{i}": i for i in range(1, entries)}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>")).save(str(path))
    return path


@pytest.mark.parametrize("entries", [500, 2000])
def test_vocab_file_of_another_size_is_refused(
    sepllm_ckpt: Path, tmp_path: Path, entries: int
) -> None:
    """The checkpoint trained with a 1024-entry tokenizer (1024 embedding rows): a smaller one
    would export a model whose ids mean other text, a larger one ids the model has no row for."""
    vocab = _word_level(tmp_path / f"tok{entries}.json", entries)
    args = ["--input_dir", str(sepllm_ckpt), "--vocab_file", str(vocab)]
    _refused(args, tmp_path / "out", CheckpointRefused, f"has {entries} entries .*1024")
