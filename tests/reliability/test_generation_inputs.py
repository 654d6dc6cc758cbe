"""Issue 22 (WEAK, generation / eval inputs): refused before the model loads, naming the
setting or file: --num_samples 0 and --chunk_size 0 (rc 0 and nothing), --temperature nan and
`maximum_tokens: abc` (raw tracebacks), an empty or non-UTF-8 prompts file (rc 0 / a codec
error without the file), an existing sample_output_file (overwritten), --num_fewshot -1
(accepted). Each call gives a model path that does not exist: the refusal comes first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate, evaluate = load("generate"), load("eval")
NO_MODEL = ["--model_name_or_path", "/nonexistent/model"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_samples", "0"], "num_samples must be an integer >= 1, got 0"),
        (["--chunk_size", "0"], "chunk_size must be an integer >= 1, got 0"),
        (["--temperature", "nan"], "temperature must be >= 0, got nan"),
        (["--top_p", "2"], "top_p must be in [0, 1], got 2.0"),
    ],
)
def test_bad_generation_settings_are_named(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        generate.settings([*NO_MODEL, *flags])
    assert message in str(exc.value)


def test_yaml_maximum_tokens_abc_is_named(tmp_path: Path) -> None:
    gen = tmp_path / "text_generation.yml"
    gen.write_text("maximum_tokens: abc\n")
    with pytest.raises(ValueError, match="maximum_tokens must be an integer >= 1, got 'abc'"):
        generate.settings([str(gen), *NO_MODEL])


def test_prompts_file_problems_are_named(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    flags = [*NO_MODEL, "--sample_input_file", str(prompts)]
    flags += ["--sample_output_file", str(tmp_path / "out.jsonl")]
    prompts.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"sample_input_file {prompts} holds no prompts"):
        generate.settings(flags)
    prompts.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{prompts}: not UTF-8 text \(byte 0xe9 at offset 3"):
        generate.settings(flags)
    prompts.write_text("ROMEO:\n")
    (tmp_path / "out.jsonl").write_text("earlier samples\n")
    with pytest.raises(ValueError, match="out.jsonl exists; pass --overwrite"):
        generate.settings(flags)
    assert generate.settings([*flags, "--overwrite"]).prompt_list == ["ROMEO:"]


def test_negative_num_fewshot_is_refused() -> None:
    flags = ["--tasks", "shakespeare_lambada", *NO_MODEL, "--num_fewshot", "-1"]
    with pytest.raises(ValueError, match="num_fewshot must be an integer >= 0, got -1"):
        evaluate.settings(flags)


def test_sepllm_flag_without_the_cache_manager_is_said() -> None:
    with pytest.warns(UserWarning, match="--enable_SepLLM takes effect only with --enable_kv_c"):
        args = generate.settings([*NO_MODEL, "--enable_SepLLM"])
    assert not args.enable_kv_cache_manager  # the full cache, as the original does
