"""Reliability case 16 (the parts beyond "all unknown keys at once", which
test_config_values.py covers): an empty train split, a mistyped data_path with prepare_data,
NeoX fp16 sub-keys, and a busy master port are refused up front with the key named.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron.config import ConfigError
from megatron.config.loader import build_config, merge_sources
from megatron.config.schema import DataConfig
from megatron.data import bundled
from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.indexed_dataset import DataError, IndexedDatasetBuilder
from megatron.launch import deepy
from tests.conftest import MINIMAL_CONFIG


def tiny_dataset(tmp_path: Path, docs: int = 3) -> str:
    prefix = str(tmp_path / "tiny_text_document")
    b = IndexedDatasetBuilder(prefix, np.int32)
    b.add_documents(np.arange(docs * 50, dtype=np.int32) % 90, np.full(docs, 50, dtype=np.int32))
    b.finalize()
    return prefix


def test_empty_train_split_is_a_clear_error(tmp_path: Path) -> None:
    cfg = DataConfig(data_path=tiny_dataset(tmp_path), split="0,100,0")
    with pytest.raises(DataError, match=r"split '0,100,0' gives the train split no documents"):
        build_train_valid_test_datasets(cfg, 16, 1, (10, 2, 0))


def test_mistyped_data_path_with_prepare_data_writes_nothing(tmp_path: Path) -> None:
    user_dir = tmp_path / "mydata"
    user_dir.mkdir()
    (user_dir / "corpus_text_document.bin").write_bytes(b"")  # the user's own data, misspelt
    cfg = DataConfig(data_path=str(user_dir / "corpus_txt_document"), prepare_data="shakespeare")
    with pytest.raises(ValueError, match=r"'.*corpus_txt_document' does not exist"):
        bundled.prepare_data(cfg)
    assert os.listdir(user_dir) == ["corpus_text_document.bin"]  # no corpus written into it


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_neox_precision_block_goes_to_deepspeed_and_typos_are_refused(kind: str) -> None:
    """NeoX hands its fp16 / bf16 block to DeepSpeed (issue 26): the loss-scale entries
    become DeepSpeed's fp16 block; a misspelt entry is refused by name, never dropped."""
    block = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "hysteresis": 2}
    cfg = build_config(merge_sources([("neox.yml", {**MINIMAL_CONFIG, kind: block})]))
    if kind == "fp16":
        assert cfg.training.precision == "fp16"
        assert cfg.training.fp16_settings == {
            "loss_scale": 0,
            "initial_scale_power": 12,
            "hysteresis": 2,
        }
    else:
        assert cfg.training.precision == "bfloat16"  # no loss scaling in bf16
    typo = {**block, "loss_scael": 0}
    with pytest.raises(ConfigError, match=r"unknown entries \['loss_scael'\]"):
        build_config(merge_sources([("neox.yml", {**MINIMAL_CONFIG, kind: typo})]))


def test_plain_precision_flag_still_maps() -> None:
    cfg = build_config(merge_sources([("neox.yml", {**MINIMAL_CONFIG, "bf16": {"enabled": True}})]))
    assert cfg.training.precision == "bfloat16"


def test_busy_master_port_found_before_the_corpus_build(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(cfg: object) -> None:
        raise AssertionError("the corpus build ran before the port check")

    monkeypatch.setattr(deepy, "prepare_bundled_data", no_build)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yml"
        cfg.write_text(
            yaml.safe_dump({**MINIMAL_CONFIG, "master_port": port, "prepare_data": "shakespeare"})
        )
        assert deepy.main(["train.py", str(cfg)]) == 2
    assert f"master_port {port} is in use on this host" in capsys.readouterr().err
