"""The one error a user can fix, and the wording of its messages: every mistake of theirs
becomes one line `error: ...` naming the field or file."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A mistake the user can fix; the message names the field or file and what was expected."""


class Unreachable(ConnectionError):
    """A cluster the run was told to join does not answer: one line `error: ...` naming the field
    that named it, exit code 1 (the input is well formed; the cluster is not there)."""


class Stalled(RuntimeError):
    """No training step finished within the watchdog's limit; the message is the one line that
    says what the run waits on. Checkpoints written before stay as they are."""


def closest(word: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' for the nearest option, or '' when nothing is close."""
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, names: list[str]) -> str:
    """The one message for a name that is not among `names`."""
    return f"{kind}: unknown value '{name}'{closest(name, names)}; expected one of {', '.join(names)}"
