"""The rule for a model's name, in one place: the trainer, the checkpoint files, the registry and the API use it.

A model's name becomes its file name, so it is letters, digits, '.', '_' and '-', at most 64 of them, starting
with a letter or digit (no path separators, no hidden files) and never with two dots in a row.
"""

from __future__ import annotations

import re

MAX_MODEL_NAME = 64
# a dot only before another allowed character or at the end: no "..", written without look-ahead so that
# pydantic's (Rust) regex engine takes the same pattern
MODEL_NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, with no '..'"


def is_model_name(name: str) -> bool:
    return len(name) <= MAX_MODEL_NAME and _MODEL_NAME.match(name) is not None


def validate_model_name(name: str) -> str:
    if not is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: {RULE}")
    return name
