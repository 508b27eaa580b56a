"""Named recipes in the expert store: ``<store>/RECIPES`` maps names to recipe texts.

The store keeps the texts and keeps their names apart from the experts' (a name is one or the other);
what a text means — the experts it merges and how — is the server's to resolve (server.service), so a
named recipe whose expert is deleted stays, and says so when it is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltaserve.experts.atomic import write_json_atomic
from deltaserve.experts.manifest import MANIFEST_FILE
from deltaserve.experts.store_errors import ExpertExistsError, StoreError, UnknownRecipeError, check_name

RECIPES_FILE = "RECIPES"
MAX_RECIPES = 10_000
MAX_RECIPE_CHARS = 1_000


class NamedRecipes:
    """The store's named recipes; experts.store.ExpertStore, which has the lock and the generation counter."""

    root: Path
    _locked: Callable[..., Any]
    _bump: Callable[..., int]

    def recipes(self) -> dict[str, str]:
        """Named recipes: name -> recipe text (as a request's `model` would write it)."""
        try:
            data = json.loads((self.root / RECIPES_FILE).read_text())
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise StoreError(f"{self.root / RECIPES_FILE} is corrupt: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise StoreError(f"{self.root / RECIPES_FILE} must map names to recipe strings")
        return data

    def set_recipe(self, name: str, text: str) -> None:
        """Name recipe ``text`` (checked by the caller) ``name``, replacing an earlier one of that name; a name
        may not be an expert's."""
        check_name(name)
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_RECIPE_CHARS:
            raise StoreError(f"a named recipe is a non-empty string of at most {MAX_RECIPE_CHARS} characters")
        with self._locked():
            if (self.root / name / MANIFEST_FILE).is_file():
                raise ExpertExistsError(f"{name!r} is an expert's name; a named recipe needs a name of its own")
            recipes = self.recipes()
            if name not in recipes and len(recipes) >= MAX_RECIPES:
                raise StoreError(f"at most {MAX_RECIPES} named recipes per store")
            recipes[name] = text.strip()
            write_json_atomic(self.root / RECIPES_FILE, recipes)
            self._bump()

    def delete_recipe(self, name: str) -> None:
        with self._locked():
            recipes = self.recipes()
            if name not in recipes:
                raise UnknownRecipeError(f"unknown named recipe {name!r}; named recipes: {sorted(recipes)[:20]}")
            del recipes[name]
            write_json_atomic(self.root / RECIPES_FILE, recipes)
            self._bump()
