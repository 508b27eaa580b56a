"""What the request's caller may see and do (``--key-file``: server.tenants), mixed into server.service.Service.

Every endpoint that names, lists or routes to experts asks here: ``visible_experts`` and ``visible_named`` are the
caller's view (cached per store state and tenant), ``unknown_expert`` the 404 that an invisible expert shares
with a missing one (its list shows only what the caller sees), ``check_owner`` the 403 for a tenant admin acting
outside its ``<tenant>.`` names. ``charge`` counts a finished request's tokens against the key's limits;
``audited`` appends to the audit log.
"""

from __future__ import annotations

from typing import Any

from deltaserve.experts.store_errors import UnknownExpertError, UnknownRecipeError
from deltaserve.server.audit import AuditLog
from deltaserve.server.exceptions import Forbidden
from deltaserve.server.limits import Limiter
from deltaserve.server.recipes import RecipeError, parse_model
from deltaserve.server.tenants import KeyRing, View, current_caller

CACHED_VIEWS = 64


def shown(names: Any, limit: int = 20) -> str:
    """A name list for an error message: the first ``limit`` names, then how many more."""
    ordered = sorted(names)
    more = f" (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return f"{ordered[:limit]}{more}"


class Scoping:
    engine: Any
    named: dict[str, str]
    base_name: str
    metrics: Any
    keys: KeyRing | None
    limiter: Limiter
    audit: AuditLog
    _views: dict[tuple, Any]

    def view(self) -> View:
        return View(self.keys is not None, current_caller())

    def visible_experts(self, view: View | None = None) -> frozenset[str]:
        view = view or self.view()
        experts = self.engine.experts
        if view.everything:
            return frozenset(experts)
        key = ("experts", self.engine.generation, id(experts), view.key)
        return self._cached(key, lambda: frozenset(n for n in experts if view.sees(n)))

    def visible_named(self, view: View | None = None) -> dict[str, str]:
        """The named recipes the caller sees: its own or public names, over experts it sees."""
        view = view or self.view()
        if view.everything:
            return self.named
        experts = frozenset(self.engine.experts)

        def build() -> dict[str, str]:
            out = {}
            for name, text in self.named.items():
                if not view.sees(name):
                    continue
                try:
                    names = parse_model(text, base_name=self.base_name, experts=experts).names
                except RecipeError:
                    continue   # not servable now: its error would name what it refers to
                if all(view.sees(n) for n in names):
                    out[name] = text
            return out
        return self._cached(("named", id(self.named), id(self.engine.experts), view.key), build)

    def _cached(self, key: tuple, build: Any) -> Any:
        hit = self._views.get(key)
        if hit is None:
            if len(self._views) >= CACHED_VIEWS:
                self._views.clear()
            hit = self._views[key] = build()
        return hit

    def unknown_expert(self, name: str) -> UnknownExpertError:
        return UnknownExpertError(f"unknown expert {name!r}; known experts: {shown(self.visible_experts())}")

    def unknown_recipe(self, name: str) -> UnknownRecipeError:
        return UnknownRecipeError(f"unknown named recipe {name!r}; named recipes: {shown(self.visible_named())}")

    def check_owner(self, name: str, what: str = "expert") -> None:
        """403 unless the caller may register or delete ``name`` (a tenant admin: ``<tenant>.<name>`` only)."""
        view = self.view()
        if view.owns(name):
            return
        caller = view.caller
        if caller is not None and caller.role == "admin" and caller.tenant:
            raise Forbidden(f"tenant {caller.tenant!r} may only manage {what}s named '{caller.tenant}.<name>', "
                            f"not {name!r}", "name")
        raise Forbidden(f"this key may not manage {what}s")

    def charge(self, tokens: int) -> None:
        """A finished request's prompt + completion tokens, against its key's tokens-per-minute limit."""
        caller = current_caller()
        if self.keys is not None and caller is not None:
            self.limiter.charge(caller, tokens)
            self.metrics.tenant_tokens.labels(caller.label).inc(tokens)

    def audited(self, event: str, **what: Any) -> None:
        self.audit.record(event, current_caller(), **what)
