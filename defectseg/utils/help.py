"""Command-line help without reStructuredText markup.

The options' help comes from Google-style docstrings written for Sphinx (``name``,
:class:`~defectseg.losses.BalancedLoss`); in a terminal that markup is noise.
:class:`DefectSegArgumentParser` prints it as plain text, for the subcommands and for the
``--model.help CLASS`` / ``--data.help CLASS`` pages alike.
"""

from __future__ import annotations

import re
from argparse import Action

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)(?:\s*<([^`>]+)>)?`")
_LITERAL = re.compile(r"``([^`]+)``")


def strip_rst(text: str) -> str:
    """``text`` with Sphinx roles and inline literals as plain words.

    ``:class:`~pkg.mod.Name``` becomes ``Name``, ``:func:`pkg.f``` becomes ``pkg.f``,
    ``:mod:`title <pkg.mod>``` becomes ``title`` and double-backquoted literals lose their quotes.
    """

    def role(match: re.Match) -> str:
        tilde, target, _ = match.groups()
        target = target.strip()
        return target.rsplit(".", 1)[-1] if tilde else target

    return _LITERAL.sub(r"\1", _ROLE.sub(role, text))


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with reStructuredText markup removed (:func:`strip_rst`)."""

    def _get_help_string(self, action: Action) -> str:
        return strip_rst(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(strip_rst(text))

    def start_section(self, heading: str | None) -> None:
        super().start_section(strip_rst(heading) if heading else heading)


class DefectSegArgumentParser(LightningArgumentParser):
    """LightningCLI's parser printing help with :class:`PlainHelpFormatter` (also the parsers
    jsonargparse makes for ``--model.help CLASS``, which take the parser's class defaults)."""

    def __init__(self, *args, formatter_class: type = PlainHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
