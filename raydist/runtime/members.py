"""Naming the actors of an attempt, so a restart line can say which one died and its pid."""

from __future__ import annotations

import os

import ray


def whoami() -> tuple[str, int]:
    """This actor's id and process id, for its driver to name it to the user if it dies."""
    return ray.get_runtime_context().get_actor_id(), os.getpid()


def dead_actor(e: BaseException) -> str | None:
    """The id of the actor whose death `e` reports: its own call failed, or a call that read
    what it made (a RayTaskError whose cause is that death)."""
    for err in (getattr(e, "cause", None), e):
        if isinstance(err, ray.exceptions.RayActorError) and getattr(err, "actor_id", None):
            return err.actor_id
    return None


class Members:
    """An attempt's actors by id, each with its name for the user and its process id."""

    def __init__(self, fallback: str) -> None:
        self.fallback, self.names = fallback, {}

    def add(self, name: str, ident: tuple[str, int]) -> None:
        self.names[ident[0]] = (name, ident[1])

    def who(self, e: BaseException) -> str:
        """'ps replica 1 (pid 1234)', or the fallback if `e` names no actor of this attempt."""
        found = self.names.get(dead_actor(e))
        return f"{found[0]} (pid {found[1]})" if found else self.fallback
