"""The GPT model as a DeepSpeed PipelineModule (1F1B), built from the same pieces as GPTModel.

Activations between stages are the tuple (hidden [B, S, h], token ids [B, S]): the ids travel
with the hidden states so every stage rebuilds the SepLLM kept-set description (and rotary
tables) for its own layers; that is cheap (O(B*S)) and avoids shipping a ragged structure.
The input embedding is tied to the output head through a TiedLayerSpec when weights are tied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.schema import Config
from megatron.model.transformer import BatchContextBuilder, Block, Embedding, OutputHead
from megatron.parallel.layers import TensorParallel, copy_to_tp

Activations = tuple[torch.Tensor, torch.Tensor]  # hidden [B, S, h], ids [B, S]


class EmbeddingPipe(Embedding):
    def forward(self, ids: torch.Tensor) -> Activations:  # type: ignore[override]
        positions = torch.arange(ids.shape[1], device=ids.device)
        return super().forward(ids, positions), ids


class BlockPipe(nn.Module):
    def __init__(self, cfg: Config, window: int, tp: TensorParallel) -> None:
        super().__init__()
        self.block = Block(cfg.model, cfg.sepllm, window, tp)
        self.context = BatchContextBuilder(cfg.model, cfg.sepllm)

    def forward(self, inputs: Activations) -> Activations:
        x, ids = inputs
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.block(x, self.context(ids, positions, x.dtype)), ids


class FinalNormPipe(nn.Module):
    """Final norm (+ the untied head); with tied weights the head is the tied embedding."""

    def __init__(self, cfg: Config, vocab: int, tp: TensorParallel) -> None:
        super().__init__()
        self.output = OutputHead(cfg.model, vocab, tp)

    def forward(self, inputs: Activations) -> torch.Tensor:
        x, _ = inputs
        if self.output.head is not None:
            return self.output(x, None)
        return self.output.final_norm(x)


def _tied_head(tp: TensorParallel):
    def forward(module: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:  # -> [B, S, V/tp]
        return F.linear(copy_to_tp(x, tp), module.embed.weight)

    return forward


def layer_specs(cfg: Config, tp: TensorParallel) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # noqa: PLC0415

    vocab, tied = cfg.derived.padded_vocab_size, not cfg.model.no_weight_tying
    weight = ["embed.weight"]
    if tied:
        first = TiedLayerSpec("embed", EmbeddingPipe, cfg.model, vocab, tp, tied_weight_attr=weight)
    else:
        first = LayerSpec(EmbeddingPipe, cfg.model, vocab, tp)
    specs = [first] + [LayerSpec(BlockPipe, cfg, w, tp) for w in cfg.derived.windows]
    specs.append(LayerSpec(FinalNormPipe, cfg, vocab, tp))
    if tied:
        specs.append(
            TiedLayerSpec(
                "embed",
                EmbeddingPipe,
                cfg.model,
                vocab,
                tp,
                forward_fn=_tied_head(tp),
                tied_weight_attr=weight,
            )
        )
    return specs


def pipe_key(name: str, num_layers: int, tied: bool) -> str:
    """GPTModel parameter name -> PipelineModule name (layer index = position in specs)."""
    if name.startswith("embedding."):
        rest = name[len("embedding.") :]
        return f"tied_modules.embed.{rest}" if tied else f"0.{rest}"
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        return f"{int(i) + 1}.block.{rest}"
    if name.startswith("output."):
        return f"{num_layers + 1}.{name}"
    raise KeyError(name)


def load_from_full(pipe: nn.Module, full_state: dict[str, torch.Tensor], cfg: Config) -> None:
    """Copy this stage's tensors out of a full (single-device layout) state dict."""
    tied, n = not cfg.model.no_weight_tying, cfg.model.num_layers
    mapped = {pipe_key(k, n, tied): v for k, v in full_state.items()}
    local = pipe.state_dict()
    missing = [k for k in local if k not in mapped]
    if missing:
        raise KeyError(f"pipeline stage parameters without a source: {missing}")
    pipe.load_state_dict({k: mapped[k] for k in local})


def build_pipeline(cfg: Config, tp: TensorParallel, topology: Any, loss_fn: Any) -> nn.Module:
    from deepspeed.pipe import PipelineModule  # noqa: PLC0415

    return PipelineModule(
        layers=layer_specs(cfg, tp),
        topology=topology,
        loss_fn=loss_fn,
        partition_method="type:BlockPipe",  # balance transformer blocks across stages
        activation_checkpoint_interval=1 if cfg.training.checkpoint_activations else 0,
        checkpointable_layers=["BlockPipe"],  # not the embedding: its input is integer ids
    )
