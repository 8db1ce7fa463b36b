"""The registry of the extra ``defectseg`` commands (name -> one-line help and function).

A command module registers itself on import with :func:`register_command`; the dispatcher
(:mod:`defectseg.cli`) reads :data:`EXTRA_COMMANDS`. Kept apart from ``defectseg.cli`` so the
command modules and the dispatcher import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

#: Extra commands: name -> (one-line help, function taking the remaining argv).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int | None]]] = {}


def register_command(name: str, help: str) -> Callable:
    """Register ``function(argv) -> exit code`` as ``defectseg <name>``."""

    def wrap(function: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
        EXTRA_COMMANDS[name] = (help, function)
        return function

    return wrap
