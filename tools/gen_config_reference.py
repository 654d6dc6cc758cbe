"""Write docs/config_reference.md from the config schema."""

from pathlib import Path

from megatron.config.reference import render

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"
    out.write_text(render())
    print(f"wrote {out}")
