"""GPT model shared by the GPT-NeoX/Pythia and Llama families (they differ only in config)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.config.validate import ffn_size
from megatron.model.attention import SelfAttention
from megatron.model.mlp import build_mlp
from megatron.model.norms import build_norm
from megatron.model.rotary import RotaryEmbedding
from megatron.sepllm.kernels import AttentionKernel, get_kernel


class Block(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        kv = m.num_kv_heads or m.num_attention_heads
        eps, nb = m.layernorm_epsilon, m.use_bias_in_norms
        self.ln1 = build_norm(m.norm, m.hidden_size, eps, nb)
        self.attn = SelfAttention(
            m.hidden_size, m.num_attention_heads, kv, m.use_bias_in_attn_linear, m.attention_dropout
        )
        self.ln2 = build_norm(m.norm, m.hidden_size, eps, nb)
        self.mlp = build_mlp(m.activation, m.hidden_size, ffn_size(m), m.use_bias_in_mlp)
        self.parallel_residual = m.gpt_j_residual
        self.drop = nn.Dropout(m.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kernel: AttentionKernel,
        window: int,
        info: object | None,
    ) -> torch.Tensor:
        attn = self.drop(self.attn(self.ln1(x), rope, kernel, window, info))
        if self.parallel_residual:  # GPT-J / NeoX: both branches read the block input
            return x + attn + self.drop(self.mlp(self.ln2(x)))
        x = x + attn
        return x + self.drop(self.mlp(self.ln2(x)))


class GPTModel(nn.Module):
    """Decoder-only LM. `windows[i]` is layer i's SepLLM window (>= seq_length: full causal)."""

    def __init__(
        self,
        m: ModelConfig,
        sep: SepLLMConfig,
        vocab_size: int,
        windows: list[int] | None = None,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.sep = m, sep
        self.windows = windows or [m.seq_length] * m.num_layers
        if len(self.windows) != m.num_layers:
            raise ValueError(f"{len(self.windows)} windows for {m.num_layers} layers")
        self.embed = nn.Embedding(vocab_size, m.hidden_size)
        max_pos = m.max_position_embeddings or m.seq_length
        self.pos_embed = nn.Embedding(max_pos, m.hidden_size) if m.pos_emb == "learned" else None
        head_dim = m.hidden_size // m.num_attention_heads
        rot = int(head_dim * m.rotary_pct)
        self.rotary = (
            RotaryEmbedding(rot, m.rotary_emb_base, max_pos) if m.pos_emb == "rotary" else None
        )
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.final_norm = build_norm(
            m.norm, m.hidden_size, m.layernorm_epsilon, m.use_bias_in_norms
        )
        self.head = None if not m.no_weight_tying else nn.Linear(m.hidden_size, vocab_size, False)
        self.emb_drop = nn.Dropout(m.hidden_dropout)
        self.checkpoint_activations = checkpoint_activations
        init_weights(self, m)

    def kernel_for(self, window: int, seq_len: int, device: torch.device) -> AttentionKernel:
        if self.sep.mode == "full" or window >= seq_len:
            return get_kernel("causal", device)
        return get_kernel(self.sep.attention_kernel, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor | None = None,  # [S] or [B, S]; default arange(S)
    ) -> torch.Tensor:  # logits [B, S, V]
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        x = self.emb_drop(x)
        rope = self.rotary.cos_sin(position_ids, x.dtype) if self.rotary is not None else None
        info = build_info(input_ids, self.sep)  # built once per batch, shared by every layer
        for block, window in zip(self.blocks, self.windows):
            kernel = self.kernel_for(window, s, x.device)
            if self.checkpoint_activations and self.training:
                x = checkpoint(block, x, rope, kernel, window, info, use_reentrant=False)
            else:
                x = block(x, rope, kernel, window, info)
        x = self.final_norm(x)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)


def build_info(input_ids: torch.Tensor, sep: SepLLMConfig) -> object | None:
    if sep.mode == "full":
        return None
    from megatron.sepllm.info import build_sep_info  # noqa: PLC0415

    return build_sep_info(input_ids, sep)


def init_weights(model: GPTModel, m: ModelConfig) -> None:
    """NeoX init: small_init on inputs, wang_init on residual outputs, zero biases."""
    h, n = m.hidden_size, m.num_layers
    small = math.sqrt(2.0 / (5.0 * h))
    in_std = small if m.init_method == "small_init" else m.init_method_std
    out_std = {
        "wang_init": 2.0 / n / math.sqrt(h),
        "scaled_normal": m.init_method_std / math.sqrt(2.0 * n),
        "normal": m.init_method_std,
    }[m.output_layer_init_method]
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if "weight" in name and ("ln" in name or "norm" in name):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        elif name.endswith(("attn.dense.weight", "mlp.down.weight")):
            nn.init.normal_(p, 0.0, out_std)
        else:
            nn.init.normal_(p, 0.0, in_std)
