"""The GPT model as a DeepSpeed PipelineModule (1F1B), built from the same pieces as GPTModel.

Activations between stages are the tuple (hidden [B, S, h], token ids [B, S]): the ids travel
with the hidden states so every stage rebuilds the SepLLM kept-set description (and rotary
tables) for its own layers; that is cheap (O(B*S)) and avoids shipping a ragged structure.
The input embedding is tied to the output head through a TiedLayerSpec when weights are tied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.checkpoint import layout
from megatron.config.schema import Config, ModelConfig, SepLLMConfig
from megatron.model.transformer import BatchContextBuilder, Block, Embedding, OutputHead
from megatron.parallel.layers import SINGLE, TensorParallel, copy_to_tp
from megatron.sepllm.bipe import token_positions

Activations = tuple[torch.Tensor, torch.Tensor]  # hidden [B, S, h], ids [B, S]


class EmbeddingPipe(Embedding):
    WRAPS = layout.EMBEDDING_WRAPS  # is GPTModel's `embedding` itself

    def __init__(self, m: ModelConfig, vocab: int, tp: TensorParallel, sep: SepLLMConfig) -> None:
        super().__init__(m, vocab, tp, sep)
        self.sep = sep

    def forward(self, ids: torch.Tensor) -> Activations:  # type: ignore[override]
        return super().forward(ids, token_positions(ids, self.sep).embed), ids


class BlockPipe(nn.Module):
    WRAPS = layout.BLOCK_WRAPS  # GPTModel's `blocks.<i>` sits at `self.block`

    def __init__(self, cfg: Config, window: int, tp: TensorParallel) -> None:
        super().__init__()
        self.block = Block(cfg.model, cfg.sepllm, window, tp)
        self.context = BatchContextBuilder(cfg.model, cfg.sepllm)
        self.sep = cfg.sepllm

    def forward(self, inputs: Activations) -> Activations:
        x, ids = inputs
        rope = token_positions(ids, self.sep).rope  # absolute, or BiPE's inter-segment index
        return self.block(x, self.context(ids, rope, x.dtype)), ids


class FinalNormPipe(nn.Module):
    """Final norm (+ the untied head); with tied weights the head is the tied embedding."""

    WRAPS = layout.OUTPUT_WRAPS  # GPTModel's `output` sits at `self.output`

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


TIED = "embed"  # the tied embedding's key in DeepSpeed's PipelineModule.tied_modules
TIED_PREFIX = f"tied_modules.{TIED}."  # the prefix of its parameters' names


@dataclass(frozen=True)
class Piece:
    """One PipelineModule layer. `source`: the GPTModel prefix of the parameters it holds
    ("" for none); inside the layer they sit under `cls.WRAPS`."""

    cls: type[nn.Module]
    args: tuple
    source: str = ""
    tied: bool = False  # lives in tied_modules[TIED], shared by the stages that hold it
    forward_fn: Callable | None = None


def pieces(cfg: Config, tp: TensorParallel) -> list[Piece]:
    """The model's pieces in pipeline order (a layer's index is its position in this list)."""
    vocab, tied = cfg.derived.padded_vocab_size, not cfg.model.no_weight_tying
    emb = (cfg.model, vocab, tp, cfg.sepllm)
    out = [Piece(EmbeddingPipe, emb, "embedding.", tied)]
    out += [
        Piece(BlockPipe, (cfg, w, tp), f"blocks.{i}.") for i, w in enumerate(cfg.derived.windows)
    ]
    out.append(Piece(FinalNormPipe, (cfg, vocab, tp), "output."))
    if tied:  # the head: the same tied embedding, applied as a projection
        out.append(Piece(EmbeddingPipe, emb, tied=True, forward_fn=_tied_head(tp)))
    return out


def layer_specs(cfg: Config, tp: TensorParallel) -> list[Any]:
    # deferred: deepspeed is a heavy import, needed only when a pipeline is built
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs: list[Any] = []
    for p in pieces(cfg, tp):
        if p.tied:
            kw = {"forward_fn": p.forward_fn} if p.forward_fn is not None else {}
            specs.append(
                TiedLayerSpec(TIED, p.cls, *p.args, tied_weight_attr=["embed.weight"], **kw)
            )
        else:
            specs.append(LayerSpec(p.cls, *p.args))
    return specs


def pipe_prefixes(cfg: Config) -> dict[str, str]:
    """GPTModel prefix -> PipelineModule prefix, for every piece holding parameters."""
    out = {}
    for index, p in enumerate(pieces(cfg, SINGLE)):
        if p.source:
            outer = TIED_PREFIX if p.tied else f"{index}."
            out[p.source] = outer + p.cls.WRAPS
    return out


def pipe_names(names: Iterable[str], cfg: Config) -> dict[str, str]:
    """GPTModel parameter name -> PipelineModule name. Raises naming an unmapped name."""
    prefixes, out = pipe_prefixes(cfg), {}
    for name in names:
        source = next((s for s in prefixes if name.startswith(s)), None)
        if source is None:
            raise KeyError(f"{name} belongs to no pipeline piece")
        out[name] = prefixes[source] + name[len(source) :]
    return out


def load_from_full(pipe: nn.Module, full_state: dict[str, torch.Tensor], cfg: Config) -> None:
    """Copy this stage's tensors out of a full (single-device layout) state dict."""
    names = pipe_names(full_state, cfg)
    mapped = {names[k]: v for k, v in full_state.items()}
    local = pipe.state_dict()
    missing = [k for k in local if k not in mapped]
    if missing:
        raise KeyError(f"pipeline stage parameters without a source: {missing}")
    pipe.load_state_dict({k: mapped[k] for k in local})


def build_pipeline(cfg: Config, tp: TensorParallel, topology: Any, loss_fn: Any) -> nn.Module:
    from deepspeed.pipe import PipelineModule  # deferred: heavy import

    return PipelineModule(
        layers=layer_specs(cfg, tp),
        topology=topology,
        loss_fn=loss_fn,
        partition_method="type:BlockPipe",  # balance transformer blocks across stages
        activation_checkpoint_interval=1 if cfg.training.checkpoint_activations else 0,
        checkpointable_layers=["BlockPipe"],  # not the embedding: its input is integer ids
    )
