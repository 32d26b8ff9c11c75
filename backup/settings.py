"""Loading typed settings from the environment, with one error for every bad variable.

Each part of the service (the manager, its API, the scheduler, the job runner) declares its
settings as a ``pydantic_settings.BaseSettings`` class; :func:`load_settings` builds any of
them and turns pydantic's ``ValidationError`` into one :class:`ConfigError` whose lines name
the environment variables, so that a bad value stops the service at start-up with a message
an operator can act on.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names each offending variable.

    A ``ValueError``: a setting's value is wrong, and callers that caught ``ValueError`` from
    the loaders before they shared this class still do.
    """


def load_settings(
    settings_class: type[SettingsT], *, part: str = "", **overrides: Any
) -> SettingsT:
    """``settings_class`` built from the environment (plus ``overrides``, by variable name).

    Raises :class:`ConfigError` listing every bad variable, one per line, with the reason
    (never the value: it may be a password or a connection string). ``part`` names the part
    of the service in the message ("invalid scheduler configuration: ..."), and stands for
    the variable when the error belongs to no single one (a rule across two settings).
    """
    try:
        return settings_class(**overrides)
    except ValidationError as exc:
        fallback = part.upper() or "CONFIGURATION"
        lines = [
            f"{'.'.join(str(p) for p in err['loc']).upper() or fallback}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
        title = f"invalid {part} configuration" if part else "invalid configuration"
        raise ConfigError(title + ":\n  " + "\n  ".join(lines)) from None
