"""lm-evaluation-harness adapter over our GPTModel (`--model sepneox`).

    lm_eval --model sepneox --model_args path=checkpoints/tiny --tasks ...   (after importing
    this module, as eval.py does; the name is registered on import)

The model is rebuilt from one of our checkpoints by megatron.inference.loading, so a SepLLM
or StreamingLLM run is scored with the kept set it trained with (its `sepllm` section), at
most its seq_length tokens per forward (longer inputs keep their last seq_length tokens).
Scoring is exact: one forward per request, no padding, so batch size does not change a score.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron.checkpoint import ReadOptions
from megatron.inference.loading import Streamer, load_model


def _flag(value: bool | str) -> bool:
    """A model_args value: True/False from eval.py, "true"/"false" from lm_eval's CLI."""
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false"):
        raise ValueError(f"sepneox model_args: expected true or false, got {value!r}")
    return str(value).lower() == "true"


@register_model("sepneox")
class SepneoxLM(TemplateLM):
    def __init__(
        self,
        path: str | None = None,
        pretrained: str | None = None,  # the hf backend's name for the same argument
        device: str = "cpu",
        max_length: int | None = None,
        max_gen_toks: int = 64,
        batch_size: int | str = 1,  # accepted for the CLI; scoring is one request at a time
        verify_checkpoint_checksums: bool | str = True,
        allow_unsafe_checkpoint_load: bool | str = False,
        **_: Any,
    ) -> None:
        super().__init__()
        source = path or pretrained
        if not source:
            raise ValueError("sepneox model: pass model_args path=<checkpoint dir>")
        options = ReadOptions(
            _flag(verify_checkpoint_checksums), _flag(allow_unsafe_checkpoint_load)
        )
        self.streamer: Streamer = load_model(source, options)
        if self.streamer.world != "ours" or self.streamer.tokenizer is None:
            raise ValueError(
                f"{source}: the sepneox model takes our checkpoints with a tokenizer; use "
                "--model hf --model_args pretrained=<dir> for transformers folders"
            )
        self._device = torch.device(device)
        self.model = self.streamer.model.to(self._device).eval()
        self.max_length = int(max_length or self.model.cfg.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self.tok = self.streamer.tokenizer

    # --- what TemplateLM needs -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eod) if self.tok.eod is not None else 0

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"sepneox:{self.streamer.source}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return list(self.tok.tokenize(string))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.detokenize(ids)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[t+1] | ids[:t+1]) rows for the input ids[:-1]: [len-1, V]."""
        x = torch.tensor([ids[:-1]], dtype=torch.long, device=self._device)
        return F.log_softmax(self.model(x)[0].float(), dim=-1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        n = len(continuation)
        logp = self._logprobs(ids)[-n:]  # rows predicting the continuation tokens
        target = torch.tensor(ids[-n:], device=self._device)
        total = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **_: Any
    ) -> list[tuple[float, bool]]:
        out = []
        for pair, ctx, cont in requests:
            result = self._score(ctx, cont)
            self.cache_hook.add_partial("loglikelihood", pair, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over the whole string, in disjoint windows of max_length tokens."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for ctx, cont in map(make_disjoint_window, windows):
                total += self._score(ctx, cont)[0]
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string or max_gen_toks (full forward each step)."""
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids, new = self.tok_encode(context), []
            text = ""
            for _ in range(limit):
                x = torch.tensor([ids[-self.max_length :]], device=self._device)
                nxt = int(self.model(x)[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                ids.append(nxt)
                new.append(nxt)
                text = self.tok_decode(new)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out
