"""generate.py and the sampling rules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron.inference.caches import make_policies
from megatron.inference.loading import load_model
from megatron.inference.sampling import Sampling, generate, sample
from tests.conftest import run_cli
from tests.inference.fixtures import write_checkpoint, write_hf_folder

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
generate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_cli)
SEP = ["--enable_kv_cache_manager", "--enable_SepLLM", "--enable_pos_shift"]
SIZES = [
    "--init_cache_size",
    "2",
    "--sep_cache_size",
    "4",
    "--local_size",
    "8",
    "--cache_size",
    "16",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    return {"ours": write_checkpoint(root / "ours"), "hf": write_hf_folder(root / "hf")}


def test_greedy_generation_same_in_both_worlds(models: dict[str, Path]) -> None:
    outs = []
    for world in ("ours", "hf"):
        streamer = load_model(str(models[world]))
        cache = streamer.new_cache(make_policies("sep", 2, 2, 4, 8, 16), [32, 44, 46], True)
        ids = streamer.tokenizer.tokenize("To be, or not to be")
        outs.append(generate(streamer, cache, ids, Sampling(0.0, max_tokens=40), chunk_size=5))
        assert max(streamer.stream_of(cache).summary()["peak_length"]) <= 16
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_input_file_and_neox_yaml(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\nWhether\n")
    out = tmp_path / "out.jsonl"
    model_yml = tmp_path / "model.yml"
    model_yml.write_text(f"load: {models['ours']}\n")
    gen_yml = tmp_path / "gen.yml"
    gen_yml.write_text(
        f"text_gen_type: input-file\nsample_input_file: {prompts}\nsample_output_file: {out}\n"
        "maximum_tokens: 12\ntemperature: 0.0\ntop_k: 5\n"
    )
    results = generate_cli.main([str(model_yml), str(gen_yml), *SEP, *SIZES])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["context"] for r in lines] == ["To be", "Whether"] and lines == results
    assert lines[0]["text"] in capsys.readouterr().out  # streamed to stdout as produced


def test_deepy_hands_generate_its_yaml_files(models: dict[str, Path], tmp_path: Path) -> None:
    """NeoX users run `python deepy.py generate.py model.yml text_generation.yml`: the launcher
    passes the files to generate.py unchanged (generation keys are not training keys)."""
    model_yml = tmp_path / "model.yml"
    model_yml.write_text(f"load: {models['ours']}\n")
    gen_yml = tmp_path / "text_generation.yml"
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n")
    gen_yml.write_text(
        f"text_gen_type: input-file\nsample_input_file: {prompts}\nsample_output_file: {out}\n"
        "maximum_tokens: 6\ntemperature: 0.0\n"
    )
    args = ["deepy.py", "generate.py", str(model_yml), str(gen_yml)]
    run_cli(args)
    launched = [json.loads(x) for x in out.read_text().splitlines()]
    out.unlink()
    direct = generate_cli.main([str(model_yml), str(gen_yml)])
    assert launched == direct and len(launched) == 1 and launched[0]["text"]


def test_bad_inputs_fail_before_loading(tmp_path: Path) -> None:
    missing = ["--model_name_or_path", str(tmp_path / "nothing"), "--text_gen_type", "input-file"]
    with pytest.raises(FileNotFoundError, match="sample_input_file"):
        generate_cli.settings([*missing, "--sample_input_file", str(tmp_path / "no.txt")])
    with pytest.raises(ValueError, match="< cache_size"):
        generate_cli.settings(["--model_name_or_path", "x", *SEP, "--cache_size", "10"])
    with pytest.raises(ValueError, match="temperature"):
        generate_cli.settings(["--model_name_or_path", "x", "--temperature", "-1"])


def test_sampling_rules() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits, Sampling(0.0)).item() == 3
    g = torch.Generator().manual_seed(0)
    top2 = {sample(logits, Sampling(1.0, top_k=2), g).item() for _ in range(200)}
    assert top2 == {2, 3}
    # softmax [0.032, 0.087, 0.237, 0.644]: top_p 0.7 keeps 3 and 2 (0.644 < 0.7)
    nucleus = {sample(logits, Sampling(1.0, top_p=0.7), g).item() for _ in range(200)}
    assert nucleus == {2, 3}


def test_interactive_reads_prompts_until_empty_line(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("To be\nWhether\n\nnever read\n"))
    argv = ["--model_name_or_path", str(models["hf"]), "--text_gen_type", "interactive"]
    results = generate_cli.main(
        [*argv, "--maximum_tokens", "5", "--temperature", "0", *SEP, *SIZES]
    )
    assert [r["context"] for r in results] == ["To be", "Whether"]


def test_neox_text_generation_keys(models: dict[str, Path], tmp_path: Path) -> None:
    """NeoX's text_generation.yml keys, in NeoX's command form (-d, -i, -o): the output file
    is written for every mode, and an existing one is refused before any work."""
    (tmp_path / "model.yml").write_text(f"load: {models['ours']}\n")
    (tmp_path / "text_generation.yml").write_text(
        "text_gen_type: unconditional\nnum_samples: 2\nmaximum_tokens: 4\ntemperature: 0.0\n"
        "recompute: false\nprompt_end: '|'\nsample_output_file: samples.jsonl\n"
    )
    out = tmp_path / "samples.jsonl"
    argv = ["-d", str(tmp_path), "model.yml", "text_generation.yml", "-o", str(out)]
    results = generate_cli.main(argv)
    assert [json.loads(x) for x in out.read_text().splitlines()] == results
    assert len(results) == 2 and all(r["context"] == "" for r in results)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        generate_cli.settings(argv)
    assert generate_cli.settings([*argv, "--overwrite"]).overwrite
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be|Whether\nor not|")
    args = generate_cli.settings(
        [*argv, "--overwrite", "-i", str(prompts), "--text_gen_type", "input-file"]
    )
    assert args.text_gen_type == "input-file" and args.recompute is False
    assert generate_cli._prompts(args) == ["To be", "Whether\nor not"]  # split at prompt_end
    with pytest.raises(ValueError, match="recompute: true"):
        generate_cli.settings([*argv, "--overwrite", "--recompute", *SEP])
