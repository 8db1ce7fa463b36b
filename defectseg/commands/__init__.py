"""Extra ``defectseg`` commands (not Lightning subcommands).

Each module registers its command with :func:`defectseg.cli.register_command` on import; add
new command modules to the import list below.
"""

from defectseg.commands import stats  # noqa: F401
