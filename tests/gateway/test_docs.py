"""The configs the README shows are configs the gateway takes: a newcomer's first copy works."""

import re
from pathlib import Path

import pytest
import yaml

from gateway.config_file import settings_from_dict

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README, re.S)
HEREDOCS = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", README, re.S)


def test_the_readme_shows_a_config_block_and_the_five_minute_config() -> None:
    assert len(YAML_BLOCKS) >= 1 and len(HEREDOCS) == 1


@pytest.mark.parametrize("text", YAML_BLOCKS + HEREDOCS)
def test_every_config_in_the_readme_validates(text: str) -> None:
    settings = settings_from_dict(yaml.safe_load(text), env={})
    assert settings.models and settings.deprecations == ()
