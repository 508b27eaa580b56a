"""What the request handlers share: settings, store, engine, metrics, router — and the
operations on them that are not about building a response (server.serving does that).

* ``resolve``: a request's ``model`` -> the recipe to serve (and the routing decision);
* ``expert_card`` / ``register`` / ``delete``: the expert admin operations;
* ``named`` / ``recipe_card`` / ``name_recipe`` / ``delete_recipe``: named recipes (the store's RECIPES);
* ``residency``: the resident recipes' IDs, named recipes included, for the gateway's metrics;
* ``sync`` / ``refresh_routing``: keep the engine's and the router's experts in step with the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any


from deltaserve.experts.store import ExpertStore
from deltaserve.experts.store_errors import ExpertExistsError, UnknownExpertError
from deltaserve.router.batcher import RouterBusy
from deltaserve.router.text import ChatMarkup
from deltaserve.server.coalesce import Coalesced
from deltaserve.server.engine.core import Engine
from deltaserve.server.engine.types import EngineProtocol, Residency
from deltaserve.server.exceptions import InvalidRequest, RoutingUnavailable, Unavailable
from deltaserve.server.audit import AuditLog
from deltaserve.server.limits import Limiter
from deltaserve.server.listing import Listings
from deltaserve.server.metrics import Metrics
from deltaserve.server.protocol.admin import ExpertCard, RecipeCard, RecipeRegistration
from deltaserve.server.recipes import Recipe, RecipeError, parse_model
from deltaserve.server.registration import AUTO, Registrations
from deltaserve.server.scoping import Scoping
from deltaserve.server.settings import ServerSettings
from deltaserve.server.tenants import KeyRing
from deltaserve.server.tools import ToolCalling

log = logging.getLogger("deltaserve")
GC_EVERY_POLLS = 30


class Service(Registrations, Scoping):
    def __init__(self, settings: ServerSettings, *, engine: EngineProtocol | None = None,
                 routing: Any = None) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.metrics_label_values)
        self.store = ExpertStore(settings.store_dir, settings.engine.base_dir)
        self.engine: EngineProtocol = engine if engine is not None else Engine(settings.engine, self.store,
                                                                               self.metrics)
        self.routing: Any = routing   # router.RoutingService, or None when `auto` serves a fixed recipe
        self._batcher: Any = None     # router.RouteBatcher over self.routing, made on first use
        self.base_name = settings.engine.served_name
        self.markup = ChatMarkup()    # the served model's chat markup, set once the tokenizer is loaded
        self.tools = ToolCalling(settings.tools, None)   # with the tokenizer once it is loaded
        self._importing = {False: asyncio.Semaphore(1), True: asyncio.Semaphore(1)}   # plain / compressing
        self._refits = Coalesced()   # router refits, shared by concurrent callers
        self._read: dict[str, tuple[Any, list[str], bool]] = {}   # what the last refit read (_refit_router)
        self.listings = Listings()        # /v1/models and /v1/experts, built once per store state
        self.named: dict[str, str] = {}   # named recipes: name -> recipe text (the store's RECIPES)
        self._names_of: dict[str, list[str]] = {}   # recipe key -> the named recipes that serve it
        self.metrics.watch(self.residency)
        self.audit = AuditLog(settings.audit_log)
        self.keys = None if settings.key_file is None else KeyRing(settings.key_file, on_reload=self._keys_reloaded)
        self.limiter = Limiter()
        self._views: dict[tuple, Any] = {}   # the callers' views of experts and recipes (server.scoping)

    def _keys_reloaded(self, ok: bool, detail: str) -> None:
        self.audited("keys_reload", ok=ok, detail=detail)

    async def start(self) -> None:
        await self.engine.start()
        await self._load_named()
        self.markup = ChatMarkup.from_tokenizer(self.engine.tokenizer)
        self.tools = ToolCalling(self.settings.tools, self.engine.tokenizer, self.base_name)
        if self.routing is None and self.settings.router.name != "none":
            from deltaserve.server.routing import build_routing

            self.routing = await asyncio.to_thread(build_routing, self, asyncio.get_running_loop())
        await self.refresh_routing()

    # ------------------------------------------------------------------ recipes
    async def resolve(self, model: str, text: str | None = None, *, record: bool = True
                      ) -> tuple[Recipe, dict | None]:
        """A request's `model` -> (recipe, routing decision as JSON or None)."""
        view = self.view()
        experts = self.visible_experts(view)
        if model == AUTO:
            if self.routing is not None and text is not None:
                try:
                    decision = await self._route_batcher().route(text, None if view.everything else experts)
                except TimeoutError:   # the uncertainty router's scoring queue is longer than its timeout
                    raise RoutingUnavailable("routing timed out: the router's scoring is overloaded; retry later or "
                                        "name a model instead of `auto`") from None
                except RouterBusy as busy:   # past the router's stated load (--route-max-pending)
                    raise RoutingUnavailable(f"the router is at capacity ({busy.pending} prompts waiting); retry "
                                             "later or name a model instead of `auto`",
                                             retry_after=busy.retry_after_s) from None
                if record:   # a dry run (/v1/route) is not a routing decision
                    self._record_route(decision)
                recipe = Recipe.of(dict(decision.recipe))
                if not view.everything and any(n not in experts for n in recipe.names):
                    return Recipe(), {**decision.to_json(), "recipe": {}, "scores": {}, "quality": {}}
                if any(n not in experts for n in recipe.names):
                    raise RoutingUnavailable(f"the router chose {recipe.key!r}, which is no longer servable")
                return recipe, decision.to_json()
            return self._auto_default(experts), {"router": None, "fallback": "no_router"}
        named = self.visible_named(view)
        if model in named and model not in experts:
            return self._named_recipe(model, experts), None
        return parse_model(model, base_name=self.base_name, experts=experts), None

    def _named_recipe(self, name: str, experts: frozenset[str]) -> Recipe:
        try:
            return parse_model(self.named[name], base_name=self.base_name, experts=experts)
        except RecipeError as err:
            raise Unavailable(f"the named recipe {name!r} = {self.named[name]!r} is not servable now: {err}") from None

    def _route_batcher(self) -> Any:
        if self._batcher is None or self._batcher.service is not self.routing:
            from deltaserve.router.batcher import RouteBatcher

            rs = self.settings.router
            bound = rs.max_pending if rs.max_pending is not None else getattr(self.routing.router, "max_pending", None)
            self._batcher = RouteBatcher(self.routing, window_s=rs.batch_window_ms / 1000, max_pending=bound)
        return self._batcher

    def _auto_default(self, experts: frozenset[str]) -> Recipe:
        text = self.settings.auto_recipe
        if not text:
            return Recipe()
        try:
            return parse_model(text, base_name=self.base_name, experts=experts)
        except RecipeError as err:
            if not self.view().everything:   # a tenant that may not use the configured recipe gets the base
                return Recipe()
            raise Unavailable(f"the configured auto recipe is not servable: {err}") from None

    def _record_route(self, decision: Any) -> None:
        m = self.metrics
        m.router_latency.labels(decision.router).observe(decision.latency_s)
        m.route_confidence.labels(decision.router).observe(decision.confidence)
        if decision.fallback:
            m.route_fallbacks.labels(decision.router, decision.fallback).inc()
            m.count_route(decision.router, "fallback")
        for name in decision.recipe:
            m.count_route(decision.router, name)

    def model_label(self, model: str) -> str:
        known = model in (AUTO, self.base_name) or model in self.engine.experts or model in self.named
        return model if known else "expression"

    # ------------------------------------------------------------------ named recipes
    def recipe_card(self, name: str) -> RecipeCard:
        text = self.visible_named().get(name)
        if text is None:
            raise self.unknown_recipe(name)
        try:
            recipe = self._named_recipe(name, frozenset(self.engine.experts))
        except Unavailable as err:
            return RecipeCard(id=name, recipe=text, key=None, unavailable=str(err))
        return RecipeCard(id=name, recipe=text, key=recipe.label(self.base_name), path=self.engine.plan(recipe).path,
                          weights=dict(recipe.terms), method=recipe.method)

    async def name_recipe(self, body: RecipeRegistration) -> RecipeCard:
        if body.name in (self.base_name, AUTO):
            raise InvalidRequest(f"{body.name!r} is reserved", "name")
        self.check_owner(body.name, "named recipe")
        if body.name in self.engine.experts:
            raise ExpertExistsError(f"{body.name!r} is an expert's name; a named recipe needs a name of its own")
        if body.recipe.strip() in self.visible_named():
            raise InvalidRequest("a named recipe names experts, not another named recipe", "recipe")
        try:
            parse_model(body.recipe, base_name=self.base_name, experts=self.visible_experts())
        except RecipeError as err:
            raise InvalidRequest(str(err), "recipe") from None
        await asyncio.to_thread(self.store.set_recipe, body.name, body.recipe)
        self.audited("name_recipe", recipe=body.name, text=body.recipe)
        await self.sync(force=True)
        return self.recipe_card(body.name)

    async def delete_recipe(self, name: str) -> None:
        if name not in self.visible_named():
            raise self.unknown_recipe(name)
        self.check_owner(name, "named recipe")
        await asyncio.to_thread(self.store.delete_recipe, name)
        self.audited("delete_recipe", recipe=name)
        await self.sync(force=True)

    def residency(self) -> Residency:
        """The engine's residency with each resident recipe also listed under its names (a gateway matches the
        request's `model` against these IDs)."""
        r = self.engine.residency()

        def ids(keys: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(dict.fromkeys(i for k in keys for i in (k, *self._names_of.get(k, ()))))
        return Residency(ids(r.running), ids(r.waiting), r.slots, r.waiting_requests, r.running_requests)

    async def _load_named(self) -> None:
        """The store's named recipes, and which names each servable recipe key has."""
        self.named = await asyncio.to_thread(self.store.recipes)
        experts = frozenset(self.engine.experts)
        names_of: dict[str, list[str]] = {}
        for name in sorted(self.named):
            try:
                names_of.setdefault(self._named_recipe(name, experts).key, []).append(name)
            except Unavailable:
                continue
        self._names_of = names_of

    # ------------------------------------------------------------------ experts
    def expert_card(self, name: str) -> ExpertCard:
        info = self.engine.experts.get(name)
        if info is None or not self.view().sees(name):
            raise self.unknown_expert(name)
        m = info.manifest
        return ExpertCard(
            id=name, kind=m.kind, codec=m.codec, density=m.density, rank=m.rank, bytes=m.bytes,
            bits_per_param=m.bits_per_param, base_params=m.base_params, base_fingerprint=m.base_fingerprint,
            source=m.source, method=m.method, task=m.task, calibration_score=m.calibration_score,
            calibration=m.calibration.model_dump() if m.calibration else None, created=m.created,
            path=self.engine.plan(Recipe(((name, 1.0),))).path, exemplars=len(self.store.exemplars(name)))

    async def delete(self, name: str) -> None:
        if not self.view().sees(name):
            raise self.unknown_expert(name)
        self.check_owner(name)
        info = self.engine.experts.get(name)
        try:
            await asyncio.to_thread(self.store.delete, name)
        except UnknownExpertError:
            raise self.unknown_expert(name) from None
        self.audited("delete", expert=name, version=getattr(info, "token", None))
        await self.sync(force=True)

    async def sync(self, force: bool = False) -> bool:
        """Follow the store: the engine's experts (re-read when its generation moved, or ``force``), then the
        router's; returns whether anything changed."""
        changed = await self.engine.refresh(force=force)
        if changed:
            await self._load_named()
            await self.refresh_routing()
        return changed

    async def refresh_routing(self) -> None:
        """The router's experts, exemplars and quality (each expert's calibration score) from the store.
        Concurrent callers share refits: each returns once a refit that started after its call has finished, so a
        burst of registrations refits the router a few times, not once per expert (a refit costs O(store))."""
        if self.routing is None:
            return
        await self._refits.run(self._timed_refit)

    async def after_restart(self) -> None:
        """The engine restarted: each expert's serving path may differ now, so the router reads them again."""
        self._read = {}
        await self.refresh_routing()

    async def _timed_refit(self) -> None:
        with self.metrics.store_refresh.labels("router").time():
            await asyncio.to_thread(self._refit_router, dict(self.engine.experts))

    def _refit_router(self, experts: dict) -> None:
        # what the last refit read of each expert (its info then, exemplars, LoRA path); a new info is a change
        read = self._read
        self._read = {n: read[n] if n in read and read[n][0] is info else self._read_expert(n, info)
                      for n, info in experts.items()}
        exemplars = {n: texts for n, (_, texts, _) in self._read.items()}
        if getattr(self.routing.router, "needs_exemplars", True):
            exemplars = {n: t for n, t in exemplars.items() if t}
        self.routing.set_exemplars(exemplars)
        self.routing.set_quality({n: info.manifest.calibration_score for n, info in experts.items()})
        self.routing.set_preferred(n for n, (_, _, lora) in self._read.items() if lora)

    def _read_expert(self, name: str, info: Any) -> tuple[Any, list[str], bool]:
        return info, self.store.exemplars(name), self.engine.plan(Recipe(((name, 1.0),))).path == "lora"

    def _prune_features(self) -> None:
        """Exemplar features on disk (``<store>/.features/``) that no expert uses any more."""
        prune = getattr(getattr(self.routing, "router", None), "prune_features", None)
        if prune is not None and (removed := prune()):
            log.info("removed %d unused exemplar feature files", removed)

    async def poll_store(self) -> None:
        """Notice experts published or deleted by other replicas (shared store); now and then remove
        retired versions past their grace period, dead processes' staging folders and unused exemplar features."""
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.store_poll_s)
            rounds += 1
            try:
                await self.sync()
                if rounds % GC_EVERY_POLLS == 0:
                    await asyncio.to_thread(self.store.collect_garbage)
                    await asyncio.to_thread(self._prune_features)
            except Exception:  # noqa: BLE001 - keep polling; the next round may succeed
                log.exception("store poll failed")
