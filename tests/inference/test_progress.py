"""evaluate_ppl's progress line: the running perplexity of every token scored so far (not one
token's NLL), tokens/s and the ETA."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron.inference.perplexity import Progress


def test_progress_line_shows_running_perplexity_rate_and_eta(
    capsys: pytest.CaptureFixture,
) -> None:
    nll = torch.rand(2500, generator=torch.Generator().manual_seed(0)) * 8  # [T]
    progress = Progress(total=2500, every=1000)
    for start in range(0, 2500, 100):
        progress.update(100, float(nll[start : start + 100].sum()))
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # at 1000 and 2000 tokens
    for line, n in zip(lines, (1000, 2000)):
        m = re.fullmatch(
            r"\[stream\] (\d+)/2500 tokens \| [\d.]+tok/s \| elapsed \d\d:\d\d, ETA \d\d:\d\d, "
            r"running ppl ([\d.]+)",
            line,
        )
        assert m, line
        assert int(m.group(1)) == n
        assert float(m.group(2)) == pytest.approx(math.exp(float(nll[:n].mean())), rel=1e-3)
