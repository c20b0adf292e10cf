"""The base of every settings object: strict (unknown keys are errors), frozen, and able to
name the field a cross-field problem is about."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; settings never change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldProblems(ValueError):
    """Problems a cross-field check found, each naming its field (relative to the object
    checked), so the config error says ``models[0].affinity_header: ...``, not ``models[0]``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))
        self.problems = problems
