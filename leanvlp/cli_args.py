"""The command-line surface shared by train.py and eval.py: a short grouped `--help`, one-line usage errors.

Both scripts parse dataclasses with transformers' `HfArgumentParser`. Its own help lists every field of
`TrainingArguments` (hundreds of lines) and its errors print the whole usage block; `LeanArgumentParser` keeps
its parsing and replaces those two: `--help` shows leanvlp's own flags first, in titled groups, each with its
help text and default, then the few Trainer flags a run usually needs and a pointer to `--help-all`; a usage
error is one `prog: error: ...` line (raised as `UsageError`, which the scripts turn into exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from transformers import HfArgumentParser


COLUMN, WIDTH = 34, 110  # where help texts start, and the line width of the short help


class UsageError(ValueError):
    """Bad command-line input: the scripts print it as one `error:` line and exit with code 2."""


@dataclasses.dataclass
class HelpGroup:
    """One titled block of the short help: `fields` of `dataclass` (all of them when None), and help texts that
    replace or supply the fields' own (`overrides`)."""

    title: str
    dataclass: type
    fields: Sequence[str] | None = None
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)


def _metavar(field: dataclasses.Field) -> str:
    kind = str(field.type)
    for name, metavar in (("bool", "BOOL"), ("int", "N"), ("float", "X"), ("list", "VALUES")):
        if name in kind:
            return metavar
    return "TEXT"


def _default(field: dataclasses.Field) -> str | None:
    if field.default is not dataclasses.MISSING:
        if field.default is None:
            return None
        return repr(field.default) if isinstance(field.default, str) else str(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return str(field.default_factory())
    return None


class LeanArgumentParser(HfArgumentParser):
    """HfArgumentParser with a short grouped help (`--help`), the full one (`--help-all`, when `full_help` is
    set), no abbreviated flags (`--lr` is not silently one of three), and one-line usage errors."""

    def __init__(self, dataclass_types: Sequence[type], *, prog: str, description: str, groups: Sequence[HelpGroup],
                 examples: Sequence[str] = (), extra_lines: Sequence[str] = (), full_help: bool = False,
                 hints: dict[str, str] | None = None) -> None:
        super().__init__(list(dataclass_types), prog=prog, description=description, allow_abbrev=False,
                         add_help=False)
        self.groups, self.examples, self.extra_lines = list(groups), list(examples), list(extra_lines)
        self.full_help, self.hints = full_help, dict(hints or {})

    def error(self, message: str) -> NoReturn:
        """argparse calls this on bad input: one line, no usage block."""
        raise UsageError(message)

    def format_short_help(self) -> str:
        """leanvlp's flags in their groups (help text, default), examples, and where the rest is listed."""
        lines = [f"usage: {self.prog} [--flag VALUE ...]", "", *textwrap.wrap(self.description, WIDTH), ""]
        if self.examples:
            lines += ["examples:", *(f"  {e}" for e in self.examples), ""]
        if self.extra_lines:
            lines += [*self.extra_lines, ""]
        for group in self.groups:
            fields = {f.name: f for f in dataclasses.fields(group.dataclass) if f.init}
            names = group.fields if group.fields is not None else list(fields)
            lines.append(f"{group.title}:")
            for name in names:
                field = fields[name]
                text = group.overrides.get(name) or field.metadata.get("help") or ""
                default = _default(field)
                required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
                suffix = " (required)" if required else f" (default: {default})" if default is not None else ""
                flag = f"  --{name} {_metavar(field)}"
                body = textwrap.wrap(text + suffix, WIDTH - COLUMN) or [""]
                if len(flag) < COLUMN:
                    lines.append(flag.ljust(COLUMN) + body[0])
                    body = body[1:]
                else:
                    lines.append(flag)
                lines += [" " * COLUMN + b for b in body]
            lines.append("")
        if self.full_help:
            lines += textwrap.wrap(f"Every other transformers.TrainingArguments flag works too: `{self.prog} "
                                   "--help-all` lists them all.", WIDTH)
        return "\n".join(lines).rstrip() + "\n"

    def parse(self, argv: Sequence[str]) -> tuple[Any, ...]:
        """The dataclasses from `argv`; `-h/--help` prints the short help, `--help-all` the full one (exit 0);
        an unknown flag is a UsageError naming the closest known one."""
        argv = list(argv)
        if "--help-all" in argv and self.full_help:
            self.print_help()
            raise SystemExit(0)
        if "-h" in argv or "--help" in argv:
            sys.stdout.write(self.format_short_help())
            raise SystemExit(0)
        *outputs, extra = self.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if extra:
            raise UsageError(self._unknown(extra))
        return tuple(outputs[:len(self.dataclass_types)])  # not the namespace of flags added by hand (--config)

    def _unknown(self, extra: Sequence[str]) -> str:
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        first = next((e for e in extra if e.startswith("-")), extra[0]).split("=")[0]
        guess = self.hints.get(first.lstrip("-")) or next(iter(difflib.get_close_matches(first, flags, n=1)), None)
        hint = f" (did you mean {guess if guess.startswith('--') else '--' + guess}?)" if guess else ""
        return f"unknown argument(s) {' '.join(extra)}{hint}; `{self.prog} --help` lists the flags"
