"""Value checks of the config sections: :class:`ConfigError`, the small range checks that name
the flag, and :class:`_Section`, the base that checks every float is finite and every ``Literal``
field one of its values, then the section's own rules."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from controlnet_ray.config.options import choices_of, flag_name


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what is allowed."""


def _shown(value: object) -> str:
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def _positive(value: float, flag: str) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be > 0, got {value}")


def _at_least_zero(value: float, flag: str, note: str = "") -> None:
    if value < 0:
        raise ConfigError(f"{flag} must be >= 0{note}, got {value:g}")


def _choice(value: object, flag: str, allowed: tuple) -> None:
    if value not in allowed:
        allowed_s = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{flag} must be one of {{{allowed_s}}}, got {value!r}")


@dataclass
class _Section:
    """Base of the config sections: checks run at construction and again on ``check()``."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the flag for the first invalid value of this section.

        Every float must be finite (NaN and inf pass ``x < 0`` / ``not x > 0`` checks and would
        train and save a broken model) and every ``Literal`` field one of its values; then the
        section's own rules. Fields added later are covered without being listed here.
        """
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), f"--{flag_name(f)}"
            values = value if isinstance(value, tuple | list) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{flag} must be a finite number, got {_shown(value)}")
            allowed = choices_of(type(self), f.name)
            if allowed is not None:
                _choice(value, flag, allowed)
        self._check()

    def _check(self) -> None:
        """The section's own rules (ranges, relations between its fields)."""
