"""The any-layout reader on hand-written layouts (fast; the real gloo runs are in
tests/hf/test_layouts.py): TP=2 module files and TP=2 x PP=2 per-layer files of a model's
weights read back as exactly the single-device state dict, and the tools' loader gives the
single-device model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.checkpoint import open_checkpoint, writer
from megatron.checkpoint.layout import layer_file, model_states_file, piece_sources
from megatron.checkpoint.weights import model_layouts
from megatron.config.loader import config_to_dict
from megatron.config.schema import Config, ModelConfig, SepLLMConfig
from megatron.inference.loading import load_model
from megatron.model.transformer import GPTModel
from megatron.parallel.sharding import shard_state
from tests.inference.fixtures import SPEC, VOCAB


def _write(root: Path, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """A checkpoint of a random model in the trainer's file layout; returns its weights."""
    cfg = Config(model=ModelConfig(**SPEC))
    cfg.data.tokenizer_type = "CharLevelTokenizer"
    cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size = tp, pp
    torch.manual_seed(0)
    full = GPTModel(cfg.model, SepLLMConfig(), VOCAB).state_dict()
    step = root / "global_step1"
    step.mkdir(parents=True)
    writer.write_config(step, config_to_dict(cfg), {})
    layouts = model_layouts(cfg, VOCAB)
    for rank in range(tp):
        shard = shard_state(full, layouts, rank, tp)
        if pp == 1:
            torch.save({"module": shard}, step / model_states_file(rank))
            continue
        for index, (source, wraps) in enumerate(piece_sources(cfg.model)):
            piece = {wraps + k[len(source) :]: v for k, v in shard.items() if k.startswith(source)}
            torch.save(piece, step / layer_file(index, rank))
    writer.finish(root, step, 1)
    return full


@pytest.mark.parametrize(
    ("tp", "pp", "source"), [(2, 1, "mp_rank model states"), (2, 2, "pipeline layer files")]
)
def test_sharded_layouts_read_as_the_single_device_weights(
    tp: int, pp: int, source: str, tmp_path: Path
) -> None:
    full = _write(tmp_path / "ckpt", tp, pp)
    ck = open_checkpoint(tmp_path / "ckpt")
    assert ck.source == source and ck.iteration == 1
    state = ck.state_dict()
    assert set(state) == set(full)
    for k, v in full.items():
        assert torch.equal(state[k], v), k
    model = GPTModel(ModelConfig(**SPEC), SepLLMConfig(), VOCAB).eval()
    model.load_state_dict(full)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "ckpt")).model(ids), model(ids))
