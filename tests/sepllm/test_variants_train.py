"""The original SepLLM trainer's variants train here: BiPE and Self-Adjust softmax from its own
keys through deepy.py (one run for both), and each variant in process on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.model.transformer import GPTModel
from tests.conftest import run_cli, step_losses, write_config


@pytest.mark.slow
def test_bipe_with_self_adjust_softmax_trains_from_the_original_keys(
    tmp_path: Path, shakespeare
) -> None:
    from megatron.data.tokenizers import tokenizer_for_file
    from megatron.sepllm.separators import separator_ids

    seps = separator_ids(tokenizer_for_file(shakespeare[1]))
    original = {  # as the original's sample configs write them (BiPE_seps: its default None)
        "separator_token_ids": seps,
        "prefill_local_window_size": 8,
        "init_tok_max_idx": 2,
        "USE_ORIGINAL_FULL_ATTEN": False,
        "streamingLLM": False,
        "USE_SEP_ATTN_KERNEL_ACCELERATOR": False,
        "USE_BiPE": True,
        "USE_SA_SOFTMAX": True,
        "SA_Numerator_Bias": 0.0,
        "SA_Denominator_Bias": 1e-10,
    }
    cfg = write_config(tmp_path, shakespeare, train_iters=20, gradient_accumulation_steps=1,
                       lr=5e-3, hidden_dropout=0.0, eval_interval=20, checkpoint_factor=20,
                       save=str(tmp_path / "ck"), sepllm=original)  # fmt: skip
    run_cli(["deepy.py", "train.py", str(cfg)])
    losses = step_losses(tmp_path / "c.yml.jsonl")
    assert sum(losses[i] for i in (18, 19, 20)) < sum(losses[i] for i in (1, 2, 3)) - 1.0
    saved = yaml.safe_load((tmp_path / "ck" / "global_step20" / "config.yml").read_text())
    sep = saved["sepllm"]
    assert (sep["mode"], sep["bipe"], sep["attention_kernel"]) == ("sepllm", True, "sa")
    assert sep["bipe_separator_token_ids"] is None and sep["separator_token_ids"] == seps


@pytest.mark.parametrize(
    "variant",
    [dict(bipe=True), dict(attention_kernel="sa"), dict(attention_kernel="sa_no_deno")],
    ids=["bipe", "sa", "sa_no_deno"],
)
def test_each_variant_learns_in_process(variant: dict) -> None:
    """A 2-layer model on a periodic text with separators: 25 AdamW steps bring the loss down."""
    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
                    hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=[1], init_tokens=2, local_window=4,
                       **variant)  # fmt: skip
    torch.manual_seed(0)
    model = GPTModel(m, sep, vocab_size=16)
    g = torch.Generator().manual_seed(1)
    words = [torch.randint(2, 16, (int(n),), generator=g) for n in torch.randint(2, 6, (40,))]
    text = torch.cat([torch.cat([w, torch.tensor([1])]) for w in words])  # 1 ends each word
    batch = torch.stack([text[i : i + 33] for i in range(0, 64, 8)])  # [8, 33]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
