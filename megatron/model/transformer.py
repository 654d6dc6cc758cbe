"""GPT model shared by the GPT-NeoX/Pythia and Llama families (they differ only in config).

The model is built from three kinds of pieces - `Embedding`, `Block`, `OutputHead` - plus a
per-batch `BatchContext` (rotary tables and the SepLLM kept-set description) computed once from
the token ids. `GPTModel` chains them on one device; the pipeline builder
(`megatron/training/pipeline.py`) places the same pieces on stages.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.model.attention import SelfAttention
from megatron.model.cache import KVCache, LayerKV, check_separators, kernel_name, layer_kept
from megatron.model.mlp import build_mlp
from megatron.model.norms import build_norm
from megatron.model.rotary import RotaryEmbedding
from megatron.parallel.layers import (
    SINGLE,
    ColumnParallelLinear,
    ReplicatedEmbedding,
    TensorParallel,
    VocabParallelEmbedding,
    copy_to_tp,
    param_init_roles,
)
from megatron.sepllm.bipe import TokenPositions, cache_step_positions, token_positions
from megatron.sepllm.info import KeptSet, build_kept_set
from megatron.sepllm.kernels import AttentionKernel, get_kernel


@dataclass
class BatchContext:
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [S, R] or [B, S, R]
    kept: KeptSet | None  # SepLLM kept set of the batch; None for full attention
    seq_len: int  # queries of this forward (= keys: training / prefill)
    # A forward over a cache: rotary positions and kept sets are per layer (what each layer
    # holds), so the blocks build them from the step and the rotary tables.
    step: Any = None
    rotary: RotaryEmbedding | None = None
    # BiPE over a cache: the step's positions continue the text's segments (the same for
    # every layer); None: each layer's cache positions.
    bipe: TokenPositions | None = None


class Embedding(nn.Module):
    """Token embedding + a learned position table when pos_emb is learned or with BiPE (its
    intra-segment table); the positions it reads are built per batch (`token_positions`)."""

    def __init__(
        self,
        m: ModelConfig,
        vocab_size: int,
        tp: TensorParallel = SINGLE,
        sep: SepLLMConfig | None = None,
    ) -> None:
        super().__init__()
        self.embed = VocabParallelEmbedding(vocab_size, m.hidden_size, tp)
        learned = m.pos_emb == "learned" or (sep is not None and sep.bipe)
        self.pos_embed = ReplicatedEmbedding(m.max_positions, m.hidden_size) if learned else None
        self.drop = nn.Dropout(m.hidden_dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [B, S, hidden]
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return self.drop(x)


class Block(nn.Module):
    def __init__(self, m: ModelConfig, sep: SepLLMConfig, window: int, tp: TensorParallel = SINGLE):
        super().__init__()
        eps, nb = m.layernorm_epsilon, m.use_bias_in_norms
        fuse = (m.layernorm_fusion, m.rmsnorm_fusion)
        self.ln1 = build_norm(m.norm, m.hidden_size, eps, nb, *fuse)
        self.attn = SelfAttention(
            m.hidden_size,
            m.num_attention_heads,
            m.kv_heads,
            m.use_bias_in_attn_linear,
            m.attention_dropout,
            tp,
            rope_fusion=m.rope_fusion,
            qkv_bias=m.qkv_bias,
        )
        self.ln2 = build_norm(m.norm, m.hidden_size, eps, nb, *fuse)
        self.mlp = build_mlp(m.activation, m.hidden_size, m.ffn_size, m.use_bias_in_mlp, tp)
        self.parallel_residual = m.gpt_j_residual
        self.drop = nn.Dropout(m.hidden_dropout)
        self.window, self.sep = window, sep
        # Trained with full attention: over a cache this layer attends every held key.
        self.full = sep.mode == "full" or window >= m.seq_length

    _dropout_warned = False

    def kernel(
        self, kept: KeptSet | None, q_len: int, device: torch.device, kv_len: int | None = None
    ) -> AttentionKernel:
        """This layer's kernel for `q_len` queries over `kept`'s keys, or over `kv_len` keys
        bottom-right causal when `kept` is None (select_kernel decides)."""
        kv_len = kept.kv_len if kept is not None else (kv_len or q_len)
        pick = functools.partial(
            kernel_name,
            self.sep,
            kept,
            q_len,
            kv_len,
            self.window,
            self.attn.head_dim,
            device_type=device.type,
        )
        dropout = self.attn.attention_dropout if self.attn.training else 0.0
        name = pick(dropout)
        if name == "dense" and dropout > 0.0 and not Block._dropout_warned:
            fast = pick(0.0)
            if fast != "dense":
                warnings.warn(
                    f"attention dropout > 0: the {fast} kernel has none, so the dense kernel "
                    "runs instead",
                    stacklevel=2,
                )
                Block._dropout_warned = True
        return get_kernel(name, self.sep)

    def forward(
        self, x: torch.Tensor, ctx: BatchContext, cache: LayerKV | None = None
    ) -> torch.Tensor:  # [B, S, hidden]
        if cache is None:
            kernel = self.kernel(ctx.kept, ctx.seq_len, x.device)
            attn = self.drop(self.attn(self.ln1(x), ctx.rope, kernel, self.window, ctx.kept))
        else:
            attn = self.drop(self._attend_cache(self.ln1(x), ctx, cache))
        if self.parallel_residual:  # GPT-J / NeoX: both branches read the block input
            return x + attn + self.drop(self.mlp(self.ln2(x)))
        x = x + attn
        return x + self.drop(self.mlp(self.ln2(x)))

    def _attend_cache(self, x: torch.Tensor, ctx: BatchContext, cache: LayerKV) -> torch.Tensor:
        """Attention of the step's n queries over this layer's cache ++ the step's keys, then
        stored (x [B, n, hidden] normed -> [B, n, hidden])."""
        n = x.shape[1]
        pos = cache.positions(ctx.step) if ctx.bipe is None else ctx.bipe.rope  # [B, n]
        rope = ctx.rotary.cos_sin(pos, x.dtype) if ctx.rotary is not None else None
        q, k, v = self.attn.project(x, rope)
        keys, values = cache.append(k.contiguous(), v.contiguous(), ctx.step, pos)
        kept, window = layer_kept(cache, n, self.sep, self.window, self.full)
        kernel = self.kernel(kept, n, x.device, kv_len=keys.shape[2])
        return self.attn.attend(q, keys, values, kernel, window, kept)


class OutputHead(nn.Module):
    """Final norm + vocabulary projection (this rank's vocabulary slice under TP)."""

    def __init__(self, m: ModelConfig, vocab_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.final_norm = build_norm(
            m.norm,
            m.hidden_size,
            m.layernorm_epsilon,
            m.use_bias_in_norms,
            m.layernorm_fusion,
            m.rmsnorm_fusion,
        )
        self.head = (
            ColumnParallelLinear(m.hidden_size, vocab_size, False, tp)
            if m.no_weight_tying
            else None
        )
        self.tp = tp

    def forward(self, x: torch.Tensor, tied_weight: torch.Tensor | None) -> torch.Tensor:
        x = self.final_norm(x)
        if self.head is not None:
            return self.head(x)
        return F.linear(copy_to_tp(x, self.tp), tied_weight)  # [B, S, V/tp]


class BatchContextBuilder(nn.Module):
    """Rotary tables and the SepLLM kept set from the token ids: built once per batch (per
    stage)."""

    def __init__(self, m: ModelConfig, sep: SepLLMConfig) -> None:
        super().__init__()
        self.rotary = (
            RotaryEmbedding(m.rotary_dims, m.rotary_emb_base, m.max_positions)
            if m.pos_emb == "rotary"
            else None
        )
        self.sep = sep

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> BatchContext:
        rope = self.rotary.cos_sin(positions, dtype) if self.rotary is not None else None
        return BatchContext(rope, build_kept_set(ids, self.sep), ids.shape[1])


class GPTModel(nn.Module):
    """Decoder-only LM, built from the model and sepllm sections alone (no world size, no
    tokenizer). `windows[i]` is layer i's SepLLM window (>= seq_length: full causal); by
    default the sepllm section's."""

    def __init__(
        self,
        m: ModelConfig,
        sep: SepLLMConfig,
        vocab_size: int,
        windows: list[int] | None = None,
        checkpoint_activations: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        windows = list(windows or sep.layer_windows(m.num_layers, m.seq_length))
        if len(windows) != m.num_layers:
            raise ValueError(f"{len(windows)} windows for {m.num_layers} layers")
        self.cfg, self.sep = m, sep
        self.embedding = Embedding(m, vocab_size, tp, sep)
        self.context = BatchContextBuilder(m, sep)
        self.blocks = nn.ModuleList(Block(m, sep, w, tp) for w in windows)
        self.output = OutputHead(m, vocab_size, tp)
        self.checkpoint_activations = checkpoint_activations
        init_weights(self, m)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor | None = None,  # [S] or [B, S]; default arange(S)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # [B, S] 1 real / 0 left padding (cache)
    ) -> torch.Tensor:  # logits [B, S, V] (V/tp under tensor parallelism)
        """Training and full-sequence evaluation without `cache`; with one, a step of S new
        tokens over what it holds (prefill chunk or decode), after which it compresses."""
        if cache is not None:
            return self._forward_cache(input_ids, cache, attention_mask)
        if attention_mask is not None:
            raise ValueError("attention_mask is only read with a cache (left-padded streaming)")
        pos = token_positions(input_ids, self.sep, position_ids)  # absolute, or BiPE's
        x = self.embedding(input_ids, pos.embed)
        ctx = self.context(input_ids, pos.rope, x.dtype)
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.output(x, self.embedding.embed.weight)

    def _forward_cache(
        self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:  # ids [B, n] -> logits [B, n, V]
        check_separators(cache, self.sep.mode, list(self.sep.separator_token_ids))
        # BiPE: the step's own positions (None: each layer's cache positions)
        bipe = cache_step_positions(self.sep, cache, ids, attention_mask, self.cfg.max_positions)
        step = cache.begin_step(ids, attention_mask)
        try:
            x = self.embedding(ids, cache.layer(0).positions(step) if bipe is None else bipe.embed)
            ctx = BatchContext(None, None, ids.shape[1], step, self.context.rotary, bipe)
            for i, block in enumerate(self.blocks):
                x = block(x, ctx, cache.layer(i))
            logits = self.output(x, self.embedding.embed.weight)
        finally:
            cache.end_step()
        return logits


def init_weights(model: nn.Module, m: ModelConfig) -> None:
    """NeoX init: small_init on inputs, wang_init on residual outputs, zero biases.

    Each parameter's role is declared by its layer (`param_specs`); parameters are visited in
    `named_parameters()` order, so the random draws are fixed by the module structure."""
    h, n = m.hidden_size, m.num_layers
    small = math.sqrt(2.0 / (5.0 * h))
    in_std = small if m.init_method == "small_init" else m.init_method_std
    out_std = {
        "wang_init": 2.0 / n / math.sqrt(h),
        "scaled_normal": m.init_method_std / math.sqrt(2.0 * n),
        "normal": m.init_method_std,
    }[m.output_layer_init_method]
    roles = param_init_roles(model)
    for name, p in model.named_parameters():
        role = roles[name]
        if role == "ones":
            nn.init.ones_(p)
        elif role == "zeros":
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, out_std if role == "output" else in_std)
