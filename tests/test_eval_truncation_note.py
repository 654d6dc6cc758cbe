"""lm-eval's hf backend warns once per truncated request (78 lines for a 2-shot eval of the
main job's model); evaluate() says it once, with the count."""

from __future__ import annotations

import inspect
import logging

import pytest
from lm_eval.models.huggingface import HFLM

from megatron.eval.harness import HF_LOGGER, TRUNCATION_WARNING, truncations_said_once


def test_lm_eval_still_warns_with_this_message() -> None:
    # the filter keys on lm-eval's wording: fail here if a new version rewords it
    assert f'f"{TRUNCATION_WARNING} (' in inspect.getsource(HFLM._loglikelihood_tokens)


def test_truncation_warnings_are_counted_and_said_once(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    lm_log = logging.getLogger(HF_LOGGER)
    with caplog.at_level(logging.INFO), truncations_said_once() as counter:
        for i in range(78):
            lm_log.warning(f"{TRUNCATION_WARNING} ({120 + i}) and continuation (2) exceeds ...")
        lm_log.warning("another warning")  # not swallowed
    assert counter.count == 78
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
    err = capsys.readouterr().err
    assert err.count("note: 78 requests were longer than the model's window") == 1
    lm_log.warning(f"{TRUNCATION_WARNING} (1) ...")  # the filter is gone afterwards
    assert caplog.records[-1].getMessage().startswith(TRUNCATION_WARNING)
