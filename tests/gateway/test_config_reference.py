"""docs/configuration.md is written from the settings' own descriptions, and kept current."""

from pathlib import Path

from gateway.commands.cli import main
from gateway.commands.config_reference import COMMAND, render, undescribed

REFERENCE = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_every_option_says_what_it_does() -> None:
    assert undescribed() == [], "give these fields a `description=` (then run: " + COMMAND + ")"


def test_the_committed_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is stale; regenerate it: {COMMAND}"
    )


def test_the_reference_names_every_section_and_the_renamed_options() -> None:
    text = render()
    for heading in ("## Top level", "## `models[].vllm`", "## `models[].on_demand`"):
        assert heading in text
    assert "| `max_header_bytes` | `max_head_bytes` |" in text
    assert "default 2 in connect mode, 5 in spawn mode" in text  # per-mode health defaults


def test_the_cli_writes_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert main(["config-reference", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
