"""How a config field describes its command-line flag (:func:`option`) and how that description
is read back (the flag's name, the field's evaluated type, its choices). :mod:`controlnet_ray.cli`
builds parsers from these; the sections' checks name flags through them."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from typing import Any, Literal, get_args, get_origin, get_type_hints


def option(
    default: Any,
    help: str,
    *,
    original: bool = False,
    flag: str | None = None,
    metavar: str | tuple[str, ...] | None = None,
    cli: bool = True,
    shared: bool = False,
) -> Any:
    """A config field described for the command line (read by :mod:`controlnet_ray.cli`).

    ``help``: the flag's help text (choices and default are added by the CLI). ``original``:
    a flag of the original script (listed first, must keep its name, default and meaning).
    ``flag``: the flag's name where it differs from the field's. ``cli=False``: a field with no
    flag. ``shared``: the flag is declared by an earlier section and sets this field too.
    """
    meta = {"help": help, "original": original, "flag": flag, "metavar": metavar}
    return field(default=default, metadata={**meta, "cli": cli, "shared": shared})


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a config field, without dashes (the field's name unless it says otherwise)."""
    return f.metadata.get("flag") or f.name


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Evaluated annotations of a config dataclass (they are strings under PEP 563)."""
    return get_type_hints(cls)


def choices_of(cls: type, name: str) -> tuple | None:
    """The allowed values of a ``Literal`` field (None for other fields): the one list of them."""
    tp = field_types(cls)[name]
    return get_args(tp) if get_origin(tp) is Literal else None
