"""The original script's command line, generated from the config dataclasses.

Every field of :class:`~controlnet_ray.config.TrainConfig`'s sections that is described by
:func:`~controlnet_ray.config.option` becomes a flag named like the field: its type, default,
choices and help come from the field, so nothing here repeats them. The original script's flags
(``original=True``) are listed first, in its order, with the same names, defaults and meaning;
the additions follow in their own groups. The dash-less ``key value`` form the original docs
also show (``data_dir train/datas/file epochs 100``) is accepted too. Importing this module must
stay cheap (no torch, no ray): invalid values have to fail in well under two seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from controlnet_ray.config import (
    ConfigError,
    TrainConfig,
    choices_of,
    field_types,
    flag_name,
    section_classes,
)

DESCRIPTION = (
    "Train ImageControlNet with Ray Train. Without --data_dir it trains on the embedded "
    "synthetic multi-view face dataset. Flags may also be given without dashes as 'key value' "
    "pairs, as in the original script's docs."
)

#: Help groups: (title of the original flags, title of the additions) per config section.
GROUPS: dict[str, tuple[str | None, str]] = {
    "data": ("original script: data", "data (additions)"),
    "model": ("original script: model", "model (additions)"),
    "optim": ("original script: training", "training (additions)"),
    "output": ("original script: training", "training (additions)"),
    "ray": (None, "Ray"),
}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag and the config fields it sets."""

    name: str
    section: str
    field: dataclasses.Field
    type: Any  # the field's evaluated annotation
    targets: tuple[tuple[str, str], ...]  # (section, field) pairs it sets

    @property
    def original(self) -> bool:
        return bool(self.field.metadata.get("original"))


def flags() -> list[Flag]:
    """Every flag, in config order, each listing all the fields it sets (``shared`` ones)."""
    found: dict[str, Flag] = {}
    for section, cls in section_classes().items():
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", False):
                continue
            name = flag_name(f)
            if f.metadata.get("shared"):
                first = found[name]  # declared by an earlier section
                found[name] = dataclasses.replace(
                    first, targets=(*first.targets, (section, f.name))
                )
            elif name in found:
                raise TypeError(f"flag --{name} is declared twice (mark the second 'shared')")
            else:
                found[name] = Flag(name, section, f, hints[f.name], ((section, f.name),))
    return list(found.values())


def _in_help_order(all_flags: list[Flag]) -> Iterator[tuple[str, list[Flag]]]:
    """(group title, its flags): every section's original flags first, then the additions."""
    for original in (True, False):
        by_title: dict[str, list[Flag]] = {}
        for fl in all_flags:
            if fl.original == original:
                title = GROUPS[fl.section][0 if original else 1]
                by_title.setdefault(title or GROUPS[fl.section][1], []).append(fl)
        yield from by_title.items()


def _value_type(tp: Any) -> Any:
    """``str | None`` -> str; ``Literal[18, 34]`` -> int; ``tuple[float, ...]`` -> float."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return _value_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is tuple:
        return _value_type(typing.get_args(tp)[0])
    return tp


def _help(fl: Flag, text: str | None = None) -> str:
    """The field's help (or ``text``), plus its default when that says something (not
    None/False)."""
    text, default = text or fl.field.metadata["help"], fl.field.default
    if default is None or isinstance(default, bool):
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def _add(
    group: argparse._ArgumentGroup | argparse.ArgumentParser,
    fl: Flag,
    help_text: str | None = None,
    required: bool = False,
    unset_means: str | None = None,
) -> None:
    """Add ``fl``; ``unset_means``: the flag defaults to None, which the command reads as that
    (e.g. "the checkpoint's"), and its help says so instead of the field's default."""
    help_shown = _help(fl, help_text)
    if unset_means is not None:
        help_shown = f"{help_text or fl.field.metadata['help']} (default: {unset_means})"
    kwargs: dict[str, Any] = {"dest": fl.name, "help": help_shown}
    if required:
        kwargs["required"] = True
    if fl.type is bool:
        group.add_argument(f"--{fl.name}", action="store_true", default=False, **kwargs)
        return
    default, metavar = fl.field.default, fl.field.metadata.get("metavar")
    choices = choices_of(section_classes()[fl.section], fl.field.name)
    if choices is not None:  # listed, not enforced here: the config's check names the flag
        metavar = "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(fl.type) is tuple:
        kwargs["nargs"] = len(typing.get_args(fl.type))
        default = list(default)
    if metavar is not None:
        kwargs["metavar"] = metavar
    if unset_means is not None:
        default = None
    group.add_argument(f"--{fl.name}", type=_value_type(fl.type), default=default, **kwargs)


def build_parser(prog: str = "python -m controlnet_ray.train") -> argparse.ArgumentParser:
    """Parser with the original flags first, then the additions, each in its own group."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    for title, group_flags in _in_help_order(flags()):
        group = p.add_argument_group(title)
        for fl in group_flags:
            _add(group, fl)
    return p


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    section: str,
    names: Sequence[str],
    *,
    help: dict[str, str] | None = None,
    required: Sequence[str] = (),
    unset_means: str | None = None,
) -> None:
    """Add the flags of ``section``'s fields ``names``, in that order, to another command's
    parser, generated as the training CLI's are (type, default, choices, help): a command that
    takes some of a section's settings (``prepare``: the data section) repeats none of them.

    ``help``: field name -> help text where the command gives the flag another context (the
    default is still the field's); ``required``: fields the command cannot do without;
    ``unset_means``: these flags default to None, read by the command as this (``evaluate``:
    "the checkpoint's"), so only values given are overrides.
    """
    by_field = {fl.field.name: fl for fl in flags() if fl.section == section}
    for name in names:
        _add(parser, by_field[name], (help or {}).get(name), name in required, unset_means)


def section_from_namespace(
    ns: argparse.Namespace, section: str, *, given_only: bool = False
) -> Any:
    """``section``'s dataclass built from the flags ``ns`` has for it; its other fields keep
    their defaults. Raises ConfigError naming the flag, as the section checks itself.
    ``given_only``: flags left at None (``unset_means``) keep the field's default too."""
    values: dict[str, Any] = {}
    for fl in flags():
        for target, name in fl.targets:
            if target == section and hasattr(ns, fl.name):
                value = getattr(ns, fl.name)
                if given_only and value is None:
                    continue
                values[name] = tuple(value) if isinstance(value, list) else value
    return section_classes()[section](**values)


def normalize_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn the original docs' dash-less ``key value`` pairs into ``--key value``.

    A bare token is rewritten only when it names a known flag exactly; boolean flags may be
    followed by true/false. Anything else is passed through so argparse reports it by name.
    """
    bool_flags = {a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction)}
    known = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    out: list[str] = []
    i = 0
    tokens = list(argv)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-") and tok in known and (i == 0 or not _expects_value(out, parser)):
            if tok in bool_flags:
                nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
                if nxt in ("true", "1", "yes"):
                    out.append(f"--{tok}")
                    i += 2
                    continue
                if nxt in ("false", "0", "no"):
                    i += 2
                    continue
            out.append(f"--{tok}")
        else:
            out.append(tok)
        i += 1
    return out


def _expects_value(out: list[str], parser: argparse.ArgumentParser) -> bool:
    """True when the previous token is a flag that still wants its value."""
    if not out or not out[-1].startswith("--"):
        return False
    flag = out[-1].split("=", 1)[0]
    for action in parser._actions:
        if flag in action.option_strings:
            return action.nargs != 0 and "=" not in out[-1]
    return False


def namespace_to_config(ns: argparse.Namespace) -> TrainConfig:
    """Build the typed config tree from parsed flags (other attributes of ``ns`` are ignored).

    Raises ConfigError naming the flag when a value is invalid (the sections check themselves).
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in section_classes()}
    for fl in flags():
        if hasattr(ns, fl.name):
            for section, name in fl.targets:
                values[section][name] = getattr(ns, fl.name)
    return TrainConfig.from_dict(values)


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; exits with status 2 and a message naming the flag on bad input."""
    parser = build_parser()
    args = normalize_argv(sys.argv[1:] if argv is None else argv, parser)
    ns = parser.parse_args(args)
    try:
        return namespace_to_config(ns).validate()
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
