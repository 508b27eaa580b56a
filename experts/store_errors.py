"""The expert store's refusals (each one a clear 4xx in the server's error table) and its name rule."""

from __future__ import annotations

import re

from deltaserve.experts.manifest import NAME_PATTERN


class StoreError(ValueError):
    """A store operation was refused; the message says why (safe to show to API clients)."""


class ExpertExistsError(StoreError):
    pass


class UnknownExpertError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownRecipeError(UnknownExpertError):
    """No named recipe of that name (a 404 like an unknown expert)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise StoreError(f"expert name {name!r} must match {NAME_PATTERN} (lowercase letters, digits, '_', '.', '-')")
    return name
