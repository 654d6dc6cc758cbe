"""HF import is exact or refused before anything is written; the same strict reading for HF
folders given to the streaming tools (generate.py / evaluate_ppl.py) and eval.py.

Each case breaks a tiny transformers Llama folder (tied, GQA, with a tokenizer) in one way
that transformers' own from_pretrained would accept (random or dropped tensors, casts, NaN)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from megatron.checkpoint import open_checkpoint
from megatron.config.schema import ModelConfig
from megatron.eval.harness import model_spec
from megatron.hf.adapters import hf_config
from megatron.hf.folder import HFFolderRefused
from megatron.hf.importer import import_hf
from megatron.inference.loading import load_model
from tests.inference.fixtures import char_tokenizer

VOCAB = 256
LLAMA = dict(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, seq_length=32,
    norm="rmsnorm", activation="swiglu", intermediate_size=64, use_bias_in_attn_linear=False,
    use_bias_in_mlp=False, use_bias_in_norms=False,
)  # fmt: skip
WEIGHTS = "model.safetensors"


def _llama(folder: Path, **spec: object) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(hf_config(ModelConfig(**{**LLAMA, **spec}), VOCAB)).save_pretrained(folder)
    char_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def _edit_weights(folder: Path, change: Callable[[dict], None]) -> None:
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def _edit_config(folder: Path, **keys: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **keys}))


def _sharded(folder: Path) -> None:
    """Two shards and an index; then one shard is lost."""
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    keys = sorted(state)
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    shards = {names[0]: keys[:5], names[1]: keys[5:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    index = {"weight_map": {k: n for n, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00002-of-00002.safetensors").unlink()


def _neox_weights(folder: Path) -> None:
    """GPT-NeoX weights under the Llama config.json."""
    from transformers import GPTNeoXForCausalLM

    neox = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, no_weight_tying=True
    )
    state = GPTNeoXForCausalLM(hf_config(neox, VOCAB)).state_dict()
    save_file({k: v.clone() for k, v in state.items()}, str(folder / WEIGHTS))


def _drop(key: str) -> Callable[[Path], None]:
    return lambda f: _edit_weights(f, lambda s: s.pop(key))


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return lambda f: _edit_weights(f, lambda s: s.__setitem__(key, value(s[key])))


def _add(key: str) -> Callable[[Path], None]:
    return lambda f: _edit_weights(f, lambda s: s.__setitem__(key, torch.zeros(2)))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _config(**keys: object) -> Callable[[Path], None]:
    return lambda f: _edit_config(f, **keys)


def _tokenizer_json(text: str | None) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        if text is None:
            (folder / "tokenizer.json").unlink()
        else:
            (folder / "tokenizer.json").write_text(text)

    return change


UP = "model.layers.1.mlp.up_proj.weight"
UNUSED = r"not used by the model \['"
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing_tensor": (_drop(UP), rf"missing \['{UP}'\]"),
    "missing_shard": (_sharded, "model-00002-of-00002.safetensors"),
    "config_more_layers": (_config(num_hidden_layers=3), r"missing \['model.layers.2."),
    "config_fewer_layers": (_config(num_hidden_layers=1), UNUSED + "model.layers.1."),
    "untied_without_head": (_config(tie_word_embeddings=False), r"missing \['lm_head.weight'\]"),
    "neox_weights_llama_config": (_neox_weights, "LlamaForCausalLM but the weights hold none"),
    "extra_tensor": (_add("model.extra.weight"), UNUSED + "model.extra.weight"),
    "int_tensor": (_set(UP, lambda t: t.long()), f"{UP} is torch.int64, not floating point"),
    "nan_tensor": (_set(UP, _nan), f"{UP} holds non-finite values"),
    "vocab_mismatch": (_config(vocab_size=300), "model.embed_tokens.weight has shape"),
    "no_tokenizer": (_tokenizer_json(None), "has no tokenizer .*--skip_tokenizer"),
    "corrupt_tokenizer": (_tokenizer_json("{not json"), "tokenizer does not load"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_refuses_before_writing(case: str, folder: Path, tmp_path: Path) -> None:
    damage, message = CASES[case]
    damage(folder)
    out = tmp_path / "ours"
    with pytest.raises(HFFolderRefused, match=message):
        import_hf(folder, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing, not even a temp


@pytest.mark.parametrize("case", ["missing_tensor", "nan_tensor", "untied_without_head"])
def test_streaming_and_eval_tools_refuse_the_same_folders(case: str, folder: Path) -> None:
    damage, message = CASES[case]
    damage(folder)
    with pytest.raises(HFFolderRefused, match=message):
        load_model(str(folder))  # generate.py and evaluate_ppl.py
    with pytest.raises(HFFolderRefused, match=message):
        model_spec(str(folder))  # eval.py, before lm-eval's hf backend


def test_skip_tokenizer_imports_the_weights_and_says_so(folder: Path, tmp_path: Path) -> None:
    (folder / "tokenizer.json").unlink()
    out = import_hf(folder, tmp_path / "ours", skip_tokenizer=True)
    assert "--skip_tokenizer" in (out / "finetune.yml").read_text()
    assert "vocab_file" not in yaml.safe_load((out / "finetune.yml").read_text())
    ck = open_checkpoint(out)
    assert ck.tokenizer() is None
    want = load_file(str(folder / WEIGHTS))
    assert torch.equal(ck.state_dict()["embedding.embed.weight"], want["model.embed_tokens.weight"])


class Payload:
    """Unpickling this creates `marker` (harmless stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_read_weights_only(folder: Path, tmp_path: Path) -> None:
    """A pytorch_model.bin holding a code-running object is refused; the object never runs."""
    marker = tmp_path / "payload_ran"
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    torch.save({**state, "extra": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(HFFolderRefused, match="refused to load checkpoint file .*pytorch_model"):
        import_hf(folder, tmp_path / "ours")
    assert not marker.exists() and not (tmp_path / "ours").exists()
