"""The chunked (vocabulary-parallel) cross-entropy equals F.cross_entropy on the full logits:
per-token losses and logit gradients, several chunks with a ragged last one, fp32 and bf16,
and split over two real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron.parallel import cross_entropy
from megatron.parallel.cross_entropy import chunked_cross_entropy

N, V = 37, 50  # 37 rows in chunks of 8: four full chunks and a ragged one


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(N, V, generator=g)).to(dtype)  # spread: a peaked softmax
    labels = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g)  # as the loss mask / mean would scale rows
    return logits, labels, weights


def _reference(logits, labels, weights):  # -> (loss [N], d logits [N, V]) in fp32
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x, labels, reduction="none")
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 8 * V)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_matches_f_cross_entropy(small_chunks, dtype: torch.dtype, tol: float) -> None:
    logits, labels, weights = _case(dtype)
    want_loss, want_grad = _reference(logits, labels, weights)
    x = logits.clone().requires_grad_()
    loss = chunked_cross_entropy(x, labels)
    (loss * weights).sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-6)
    # bf16: the gradient is rounded once, from the fp32 value
    torch.testing.assert_close(x.grad.float(), want_grad, atol=tol, rtol=tol)
    torch.testing.assert_close(x.detach(), logits)  # the logits are not modified


def test_label_outside_the_vocabulary_is_an_error() -> None:
    logits, labels, _ = _case(torch.float32)
    labels[3] = V
    with pytest.raises((IndexError, RuntimeError)):
        chunked_cross_entropy(logits, labels)


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cross_entropy.CHUNK_ELEMENTS = 8 * V  # several chunks of this rank's V/2 columns
    logits, labels, weights = _case(torch.float32)
    cols = slice(rank * V // 2, (rank + 1) * V // 2)
    x = logits[:, cols].clone().requires_grad_()
    loss = chunked_cross_entropy(x, labels, rank * V // 2, dist.group.WORLD)
    (loss * weights).sum().backward()
    torch.save({"loss": loss.detach(), "grad": x.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_vocabulary_parallel_over_two_gloo_ranks(tmp_path) -> None:
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    want_loss, want_grad = _reference(*_case(torch.float32))
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in range(2):  # every rank returns the full per-token loss
        torch.testing.assert_close(got[r]["loss"], want_loss, atol=1e-5, rtol=1e-6)
    grad = torch.cat([got[0]["grad"], got[1]["grad"]], dim=1)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
