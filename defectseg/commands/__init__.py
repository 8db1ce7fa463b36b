"""Extra ``defectseg`` commands (not Lightning subcommands).

Each module registers its command with :func:`defectseg.commands.registry.register_command` on
import; add new command modules to the import list below.
"""

from defectseg.commands import (
    compare,  # noqa: F401
    dli_preview,  # noqa: F401
    export,  # noqa: F401
    infer,  # noqa: F401
    stats,  # noqa: F401
)
