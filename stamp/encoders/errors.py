"""Errors raised by the encoder registry and the weights loader.

Each message is one line that names the encoder or file and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path


class EncoderError(Exception):
    """Base class of every encoder error."""


class UnknownEncoderError(EncoderError, KeyError):
    """An encoder name that is not in the registry."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name = name
        self.valid = valid
        super().__init__(f"unknown encoder {name!r}; valid names: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingExtraError(EncoderError, ImportError):
    """The encoder needs an optional dependency group (a pip extra) that is not installed."""

    def __init__(self, name: str, extra: str, missing: str | None = None) -> None:
        self.encoder = name
        self.extra = extra
        why = f" (cannot import {missing!r})" if missing else ""
        super().__init__(f"encoder {name!r} needs the extra: pip install 'stamp-orchestrated[{extra}]'{why}")


class WeightsNotFoundError(EncoderError, FileNotFoundError):
    """No local copy of a weight file: names where we looked and the command that fetches it."""

    def __init__(self, name: str, filename: str, searched: list[str], command: str) -> None:
        self.encoder = name
        self.filename = filename
        self.searched = searched
        self.command = command
        where = "; ".join(searched) if searched else "nowhere"
        super().__init__(
            f"weights for encoder {name!r} not found: {filename} (looked in: {where}). Fetch them with: {command}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class WeightsDigestError(EncoderError, ValueError):
    """A weight file whose sha256 differs from the lock: it is refused."""

    def __init__(
        self, path: str | os.PathLike[str], expected: str, actual: str, name: str | None = None
    ) -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        self.encoder = name
        who = f" of encoder {name!r}" if name else ""
        super().__init__(
            f"refusing weight file {self.path}{who}: sha256 {actual} does not match the locked {expected}; "
            "re-download it, or if you trust this file pin its digest in the weights lock (STAMP_WEIGHTS_LOCK)"
        )


class WeightsUnverifiedError(EncoderError, ValueError):
    """A weight file whose digest the lock does not know, where one is required (strict mode, remote code)."""

    def __init__(self, path: Path | str, actual: str, name: str, *, why: str = "in strict mode") -> None:
        self.path = Path(path)
        self.actual = actual
        self.encoder = name
        super().__init__(
            f"refusing weight file {self.path} of encoder {name!r} {why}: the lock has no sha256 for it "
            f"(actual {actual}); review the file, then pin it with "
            f"`python -m stamp.encoders pin {name} --weights-dir DIR -o LOCK` and set STAMP_WEIGHTS_LOCK=LOCK"
        )


class WeightsOutsideRootError(EncoderError, ValueError):
    """A weight file that resolves (through a symlink or ``..``) outside the folder it was looked up in."""

    def __init__(self, path: Path | str, real: Path | str, root: Path | str, name: str) -> None:
        self.path = Path(path)
        self.real = Path(real)
        self.root = Path(root)
        self.encoder = name
        super().__init__(
            f"refusing weight file {self.path} of encoder {name!r}: it resolves to {self.real}, outside the "
            f"weights folder {self.root}; copy the file into {self.root} instead of linking to it"
        )


class OperatingPointWarning(UserWarning):
    """A preprocessing config whose tile scale or size is not the one the encoder was trained at.

    Emitted when the config is validated; ``preprocessing.strict_operating_point: true`` makes it an error.
    """
