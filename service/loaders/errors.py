"""The error every loader raises for a file it cannot use."""

from __future__ import annotations

from pathlib import Path


class ModelFileError(Exception):
    """A model, tokenizer or autoencoder file is missing, unreadable or does not fit."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
