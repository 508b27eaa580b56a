"""Server parts without the engine: recipes, the dense-path scheduler, merged adapters, the store."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

from deltaserve.experts.sources import SourceError
from deltaserve.experts.sources import Compression
from deltaserve.experts.store import ExpertExistsError, ExpertStore, StoreError, UnknownExpertError
from deltaserve.server.engine.adapters import AdapterCache, write_merged_adapter
from deltaserve.server.recipes import Recipe, RecipeError, parse_model
from deltaserve.server.engine.scheduler import WeightScheduler
from deltaserve.server.worker.host_cache import HostDeltaCache
from deltaserve.server.worker.layout import probe_layout

EXPERTS = frozenset({"add", "rev", "code-v2", "m.1"})


# ---------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("text,key", [
    ("base", ""), ("add", "add"), ("0.7*add+0.3*rev", "0.7*add+0.3*rev"), (" 0.3 * rev + 0.7*add ", "0.7*add+0.3*rev"),
    ("add-0.5*rev", "add-0.5*rev"), ("1e-1*add", "0.1*add"), ("ties:add+rev", "ties:add+rev"),
    ("ta:add+code-v2", "add+code-v2"), (".5*m.1", "0.5*m.1"), ("0.33333*add", "0.3333*add"),
    ("dare_ties(seed=3,density=0.5):add+rev", "dare_ties(density=0.5;seed=3):add+rev"),
    ("dare_ties(density=0.5; seed=3):add+rev", "dare_ties(density=0.5;seed=3):add+rev"),
])
def test_parse_model_canonical(text, key):
    recipe = parse_model(text, base_name="base", experts=EXPERTS)
    assert recipe.key == key and "," not in recipe.key   # the gateway's endpoint picker splits IDs on commas
    assert parse_model(key or "base", base_name="base", experts=EXPERTS) == recipe   # the key is itself a `model`


@pytest.mark.parametrize("text,words", [
    ("", "non-empty"), ("nope", "unknown expert 'nope'"), ("0.5*add+", "cannot parse"), ("add rev", "cannot parse"),
    ("add+add", "twice"), ("100*add", "|w| <= 10"), ("0*add", "non-zero"), ("foo:add", "unknown merge method"),
    ("0.5**add", "unknown expert '0.5'"), ("+".join(f"0.1*{n}" for n in ["add", "rev"] * 5), "twice"),
])
def test_parse_model_errors_say_what_is_wrong(text, words):
    with pytest.raises(RecipeError, match=None) as err:
        parse_model(text, base_name="base", experts=EXPERTS)
    assert words in str(err.value)


def test_recipe_of_is_canonical_and_hashable():
    a = Recipe.of({"rev": 0.3, "add": 0.7})
    b = Recipe.of({"add": 0.70001, "rev": 0.29999, "code-v2": 0.0})
    assert a == b and hash(a) == hash(b) and a.names == ("add", "rev")
    assert Recipe().key == "" and Recipe().label("base") == "base"


# ---------------------------------------------------------------------------- scheduler

class RecordedSwaps:
    """The scheduler's injected apply step, recording the weight states it was asked for (not an engine)."""

    def __init__(self, swap_s=0.01):
        self.swap_s, self.applied, self.active_during = swap_s, [], []

    async def apply(self, state, payload):
        await asyncio.sleep(self.swap_s)
        self.applied.append(state)


def test_scheduler_batches_one_recipe_and_swaps_between_groups():
    async def main():
        eng = RecordedSwaps()
        s = WeightScheduler(eng.apply, max_wait_s=10.0)
        seen = []

        async def request(state, work=0.02):
            async with s.hold(state):
                seen.append((state, s.active))
                await asyncio.sleep(work)
        await asyncio.gather(*(request(x) for x in ["a", "a", "b", "a", "b", "", "b"]))
        return eng, s, seen
    eng, s, seen = asyncio.run(main())
    assert all(state == active for state, active in seen)   # never served under the wrong weights
    assert eng.applied.count("a") == 1 and eng.applied.count("b") == 1  # each group swapped in once
    assert s.inflight == 0 and not s.waiting()


def test_scheduler_max_wait_bounds_starvation_under_a_busy_recipe():
    async def main():
        eng = RecordedSwaps(swap_s=0.0)
        s = WeightScheduler(eng.apply, max_wait_s=0.05, initial_state="hot")
        stop = asyncio.Event()

        async def hot_stream():
            while not stop.is_set():
                async with s.hold("hot"):
                    await asyncio.sleep(0.01)

        async def rare():
            t0 = asyncio.get_running_loop().time()
            async with s.hold("rare"):
                return asyncio.get_running_loop().time() - t0
        hot = [asyncio.create_task(hot_stream()) for _ in range(4)]
        await asyncio.sleep(0.03)
        waited = await asyncio.wait_for(rare(), timeout=2.0)
        stop.set()
        await asyncio.gather(*hot)
        return waited
    waited = asyncio.run(main())
    assert waited < 0.05 + 0.1        # max_wait plus the in-flight requests' drain


def test_scheduler_failed_swap_fails_only_its_requests():
    async def main():
        async def apply(state, payload):
            if state == "bad":
                raise RuntimeError("decode failed")
        s = WeightScheduler(apply, max_wait_s=0.0)

        async def request(state):
            async with s.hold(state):
                return state
        return await asyncio.gather(request("bad"), request("good"), return_exceptions=True)
    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == "good"


def test_scheduler_cancelled_waiter_leaves_no_trace():
    async def main():
        eng = RecordedSwaps(swap_s=0.0)
        s = WeightScheduler(eng.apply, max_wait_s=10.0, initial_state="a")
        release = asyncio.Event()

        async def hold_a():
            async with s.hold("a"):
                await release.wait()
        t = asyncio.create_task(hold_a())
        await asyncio.sleep(0)
        w = asyncio.create_task(s.hold("b").__aenter__())
        await asyncio.sleep(0.01)
        w.cancel()
        await asyncio.sleep(0.01)
        release.set()
        await t
        return s
    s = asyncio.run(main())
    assert s.inflight == 0 and not s.waiting() and s.active == "a"


# ---------------------------------------------------------------------------- worker helpers

class _PropertyLoaded(torch.nn.Parameter):
    """As vLLM's BasevLLMParameter: the loader behind a property whose deleter drops it."""

    _loader = None

    @property
    def weight_loader(self):
        if self._loader is None:
            raise AttributeError("weight_loader attribute has been deleted")
        return self._loader

    @weight_loader.setter
    def weight_loader(self, value):
        self._loader = value

    @weight_loader.deleter
    def weight_loader(self):
        self._loader = None


def test_layout_probe_groups_the_tensors_of_one_module_and_writes_nothing():
    """A model whose loader stacks q/k/v into one parameter and two experts into another, as vLLM's do; the
    loaders are put back as they were (a plain attribute, none, or vLLM's property)."""
    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(4, 12, bias=False)
            self.o = torch.nn.Linear(4, 4, bias=False)
            self.experts = _PropertyLoaded(torch.zeros(2, 4, 4))
            self.experts.weight_loader = lambda p, w, expert_id, return_success: p.data[expert_id].copy_(w)
            self.qkv.weight.weight_loader = lambda p, w, shard: p.data[shard * 4:(shard + 1) * 4].copy_(w)

        def load_weights(self, weights):
            params = dict(self.named_parameters())
            for name, w in weights:
                if ".experts." in name:
                    params["experts"].weight_loader(params["experts"], w, expert_id=int(name.split(".")[2]),
                                                   return_success=True)
                elif name.split(".")[1] in "qkv":
                    params["qkv.weight"].weight_loader(params["qkv.weight"], w, "qkv".index(name.split(".")[1]))
                elif name in ("m.o.weight",):
                    getattr(params["o.weight"], "weight_loader", lambda p, w: p.data.copy_(w))(params["o.weight"], w)

    model = Stacked()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = {**{f"m.{x}.weight": torch.ones(4, 4) for x in "qkvo"},
            **{f"m.experts.{i}.weight": torch.ones(4, 4) for i in range(2)}, "m.unknown.weight": torch.ones(4)}
    layout = probe_layout(model, base)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())      # nothing written
    assert not hasattr(model.o.weight, "weight_loader") and model.qkv.weight.weight_loader is not None
    model.load_weights([("m.experts.1.weight", torch.ones(4, 4))])   # the property's loader survived the probe
    assert model.experts[1].eq(1).all() and model.experts[0].eq(0).all()
    assert layout.siblings({"m.k.weight"}) == {"m.q.weight", "m.k.weight", "m.v.weight"}
    assert layout.siblings({"m.experts.1.weight"}) == {"m.experts.0.weight", "m.experts.1.weight"}
    assert layout.siblings({"m.o.weight"}) == {"m.o.weight"}
    assert layout.unloadable(base) == ["m.unknown.weight"]


def test_host_cache_is_lru_by_bytes():
    class E:
        def decode(self, name, dtype):
            return torch.zeros(256, dtype=dtype)   # 1 KiB
    cache = HostDeltaCache(budget_bytes=2048)
    for name in ("a", "b", "a", "c", "a", "b"):
        cache.get("tok", E(), name)
    assert (cache.hits, cache.misses, cache.evictions) == (2, 4, 2) and cache.bytes == 2048
    cache.drop("tok")
    assert cache.bytes == 0

    class Sparse:
        def entries(self, name):
            return torch.arange(64), torch.ones(64, dtype=torch.float16)   # 512 + 128 bytes
    first = cache.entries("s", Sparse(), "a")
    assert all(a is b for a, b in zip(first, cache.entries("s", Sparse(), "a"))) and cache.bytes == 640


# ---------------------------------------------------------------------------- merged adapters and store

def _lora_expert(store, zoo, task, name):
    store.import_source(name, zoo.layout.lora(task))
    return store.load(name)


def test_merged_adapter_is_exactly_the_weighted_sum(micro_zoo, tmp_path):
    from safetensors.torch import load_file

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    e1 = _lora_expert(store, micro_zoo, "upper", "a")
    e2 = _lora_expert(store, micro_zoo, "length", "b")
    rank = write_merged_adapter(tmp_path / "ad", [e1, e2], [0.7, -0.2], store.shapes)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert rank == cfg["r"] == cfg["lora_alpha"] == 16
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for name in e1.param_names:
        stem = "base_model.model." + name.removesuffix(".weight")
        got = t[f"{stem}.lora_B.weight"] @ t[f"{stem}.lora_A.weight"]
        want = 0.7 * e1.decode(name, torch.float32) - 0.2 * e2.decode(name, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_adapter_cache_never_removes_an_adapter_in_use(micro_zoo, tmp_path):
    """Step through pin, evict, retire and release; the slots after each step (vLLM LoRA manager style)."""
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    e1 = _lora_expert(store, micro_zoo, "upper", "a")
    e2 = _lora_expert(store, micro_zoo, "length", "b")
    cache = AdapterCache(tmp_path / "cache", capacity=1)
    first, ev = cache.build("k1", [e1], [1.0], store.shapes)          # built pinned
    second, ev2 = cache.build("k2", [e2], [1.0], store.shapes)        # k1 is in use: over capacity, no eviction
    assert ev == ev2 == [] and cache.pinned == 2 and first.path.is_dir()
    assert cache.release(first) == [first]                             # unpinned -> the LRU trims it now
    assert cache.acquire("k1") is None and cache.acquire("k2") == second   # k2 now pinned twice
    assert cache.invalidate("b") == [] and second.path.is_dir()        # in use: retired, files kept
    assert cache.acquire("k2") is None                                 # unreachable for new requests
    assert cache.release(second) == [] and cache.release(second) == [second]   # freed at the last release
    assert cache.pinned == 0
    again, _ = cache.build("k1", [e1], [1.0], store.shapes)
    assert again.lora_id != first.lora_id and cache.release(again) == []   # within capacity: kept


def test_store_passes_the_nps_search_options_through(micro_zoo, tmp_path):
    with pytest.raises(ValueError, match="max_weight"):
        Compression(method="nps", max_weight=0.5)
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    comp = Compression(method="nps", density=0.1, generations=1, population=2, banding="per-tensor", max_weight=2.0)
    manifest = store.import_source("up", micro_zoo.layout.full("upper"), compression=comp,
                                   objective=lambda deltas: float(sum(d.abs().sum() for d in deltas.values())))
    method = manifest.method
    assert method["banding"] == "per-tensor" and method["population"] == 2 and method["max_weight"] == 2.0
    assert all(0.0 <= w <= 2.0 for w in method["weights"])


def test_store_publish_is_atomic_generational_and_checks_the_base(micro_zoo, tmp_path):
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    assert store.generation() == 0 and store.names() == []
    store.import_source("up", micro_zoo.layout.full("upper"), compression=Compression(method="magnitude", density=0.1),
                        exemplars=["Uppercase this: a"])
    assert store.generation() == 1 and store.exemplars("up") == ["Uppercase this: a"]
    with pytest.raises(ExpertExistsError):
        store.import_source("up", micro_zoo.layout.lora("upper"))
    # A write that fails midway leaves nothing behind.
    def explode(stage):
        stage.mkdir()
        (stage / "manifest.json").write_text("{}")
        raise OSError("disk full")
    with pytest.raises(OSError):
        store.publish("half", explode)
    assert store.names() == ["up"] and not [p for p in os.listdir(store.root) if p.startswith(".staging")]
    # An expert made for another base is refused (fingerprint), whatever its name.
    other = tmp_path / "other-base"
    import shutil
    shutil.copytree(micro_zoo.layout.base, other)
    from safetensors.torch import load_file, save_file
    w = load_file(other / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] + 1
    save_file(w, other / "model.safetensors")
    foreign = ExpertStore(tmp_path / "foreign", other)
    with pytest.raises(ValueError, match="made for base"):
        foreign.import_source("up", store.path("up"))
    with pytest.raises(StoreError, match="must match"):
        store.import_source("../escape", micro_zoo.layout.lora("upper"))
    store.delete("up")
    assert store.names() == [] and store.generation() == 2
    with pytest.raises(UnknownExpertError):
        store.delete("up")
    with pytest.raises(SourceError, match="neither"):
        store.import_source("x", tmp_path)


@pytest.mark.parametrize("codec_method,weight", [("magnitude", 1.0), ("dare", 0.7), ("tswitch", 1.0), ("lora", 0.8)])
def test_single_sparse_expert_added_in_place_equals_the_merge_loop(micro_zoo, tmp_path, codec_method, weight):
    """The worker's fast path for one sparse or LoRA expert (base + w * tau, added in place) writes exactly the
    tensors merged_params writes; other codecs (ternary here) take the merge loop."""
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.merge.checkpoint import merged_params
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import ExpertStore
    from deltaserve.server.engine.contracts import MergeItem, MergeRequest
    from deltaserve.server.worker.state import DeltaState, _adds_in_place

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    if codec_method == "lora":
        store.import_source("e", micro_zoo.layout.lora("upper"))
    else:
        store.import_source("e", micro_zoo.layout.full("upper"), compression=Compression(method=codec_method,
                                                                                          density=0.05))
    expert = load_expert(store.path("e"))
    token = f"e@{expert.manifest.sha256['tensors.safetensors'][:16]}"
    request = MergeRequest(key="e", items=(MergeItem(path=str(store.path("e")), token=token, weight=weight),))
    state = DeltaState(str(micro_zoo.layout.base), 1 << 30)
    targets = state.expand(set(expert.param_names))
    want = dict(merged_params(sorted(targets), state.base, lambda i, n: expert.decode(n, torch.float32)
                              if n in expert.param_names else None, 1, "task_arithmetic", [weight]))
    for _ in range(2):   # the second swap reads the expert from the host cache (entries or dense deltas)
        got = dict(state.weights(request, targets, set()))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert _adds_in_place(request, [expert]) == (expert.manifest.codec in ("sparse", "sparse_ef", "lowrank"))
    cached = 0 if expert.manifest.codec == "lowrank" else len(expert.param_names)   # B @ A is not cached
    assert state.cache.misses == cached and state.cache.hits == cached


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, -0.7, 1.2), (1.0, 0.25, 0.5, 2.0)])
def test_sparse_blend_summed_in_place_equals_the_merge_loop(micro_zoo, tmp_path, weights):
    """A task-arithmetic blend of sparse and LoRA experts (overlapping supports, different codecs and densities)
    is summed in place, bit-identical to merged_params; a blend with a ternary expert takes the loop."""
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.merge.checkpoint import merged_params
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import ExpertStore
    from deltaserve.server.engine.contracts import MergeItem, MergeRequest
    from deltaserve.server.worker.state import DeltaState, _adds_in_place

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    specs = [("upper", "magnitude", 0.3), ("upper", "dare", 0.2), (micro_zoo.spec.tasks[-1], "lora", None),
             ("upper", "magnitude", 0.02)]
    experts, items = [], []
    for i, w in enumerate(weights):
        task, method, density = specs[i]
        if method == "lora":
            store.import_source(f"e{i}", micro_zoo.layout.lora(task))
        else:
            store.import_source(f"e{i}", micro_zoo.layout.full(task), compression=Compression(method=method,
                                                                                               density=density))
        expert = load_expert(store.path(f"e{i}"))
        experts.append(expert)
        items.append(MergeItem(path=str(store.path(f"e{i}")),
                               token=f"e{i}@{expert.manifest.sha256['tensors.safetensors'][:16]}", weight=w))
    request = MergeRequest(key="blend", items=tuple(items))
    state = DeltaState(str(micro_zoo.layout.base), 1 << 30)
    targets = state.expand({n for e in experts for n in e.param_names})
    got = dict(state.weights(request, targets, set()))

    def delta(i, n):
        return experts[i].decode(n, torch.float32) if n in experts[i].param_names else None

    want = dict(merged_params(sorted(targets), state.base, delta, len(experts), "task_arithmetic", list(weights)))
    assert _adds_in_place(request, experts)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    kept = sum(len(e.param_names) for e in experts if e.manifest.codec != "lowrank")
    assert (state.cache.misses, state.cache.hits) == (kept, 0)
    again = dict(state.weights(request, targets, set()))   # every expert's entries from the host cache
    assert (state.cache.misses, state.cache.hits) == (kept, kept)
    assert all(torch.equal(again[n], want[n]) for n in want)
    store.import_source("t", micro_zoo.layout.full("upper"), compression=Compression(method="tswitch", density=0.05))
    assert not _adds_in_place(request, [*experts, load_expert(store.path("t"))])


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    """vLLM's engine opens sockets on OS-assigned ports while the server starts; the server's own port must not
    come from that range (it once did, and one of the engine's sockets took it first)."""
    import socket

    from deltaserve.server.launch import _ephemeral_range, free_port

    port = free_port()
    assert 1024 <= port < _ephemeral_range()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_failed_start_reports_the_root_cause_lines_before_the_tail(tmp_path):
    """A worker's error sits far above the engine's own traceback: the report puts it first, with the machine."""
    from deltaserve.server.launch import ServerProcess

    log = tmp_path / "server.log"
    log.write_text("\n".join(["starting"] * 5 + ["(Worker pid=7) ERROR RuntimeError: shm_open failed: No space left"]
                             + [f"  File \"x.py\", line {i}, in f" for i in range(100)]
                             + ["RuntimeError: Engine core initialization failed."]) + "\n")
    server = object.__new__(ServerProcess)
    server.log_path = log
    report = server.failure_report(tail=5)
    head, tail = report.split("--- log tail:")
    assert head.startswith("machine: ") and "MemAvailable" in head
    assert "shm_open failed" in head and "Engine core initialization failed" in head and "File " not in head
    assert "shm_open failed" not in tail and tail.strip().endswith("Engine core initialization failed.")


def test_tool_messages_reach_the_template_as_vllm_gives_them():
    """An assistant's tool calls keep their ids with arguments decoded to an object (``{}`` when not one), a tool
    message its ``tool_call_id``; a call of another type is a 400 naming the message."""
    from deltaserve.server.exceptions import InvalidRequest
    from deltaserve.server.prompts import plain_messages

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    broken = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[1"}}
    out = plain_messages([{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": None, "tool_calls": [call, broken]},
                          {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]}])
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "f", "arguments": {"x": 1}}},
        {**broken, "function": {"name": "g", "arguments": {}}}]}
    assert out[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    with pytest.raises(InvalidRequest) as err:
        plain_messages([{"role": "assistant", "content": "", "tool_calls": [{"type": "custom", "custom": {}}]}])
    assert err.value.param == "messages.0.tool_calls"


def test_tool_choices_need_the_parser_and_flag_vllm_serve_needs():
    """Without a parser only ``none`` is served; ``auto`` needs --enable-auto-tool-choice too (vLLM's messages)."""
    from types import SimpleNamespace

    from deltaserve.server.exceptions import InvalidRequest
    from deltaserve.server.settings import ToolSettings
    from deltaserve.server.tools import ToolCalling

    tools = [object()]
    named = SimpleNamespace(function=SimpleNamespace(name="f"))
    bare = ToolCalling(ToolSettings(), tokenizer=None)
    for choice, words in (("auto", '"auto" tool choice requires --enable-auto-tool-choice'),
                          ("required", 'tool_choice="required" requires --tool-call-parser'),
                          (named, 'tool_choice=function "f" requires --tool-call-parser')):
        with pytest.raises(InvalidRequest, match=words):
            bare.check(SimpleNamespace(tools=tools, tool_choice=choice))
    bare.check(SimpleNamespace(tools=tools, tool_choice="none"))
    assert bare.prepare(SimpleNamespace(tools=tools, tool_choice="none", chat_template_kwargs=None))[1] is None
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ToolSettings(enable_auto_tool_choice=True)


def test_hermes_output_becomes_tool_calls_as_vllm_reads_it(zoo_tokenizer):
    """`auto` with vLLM's hermes parser: a call in the model's text becomes ``tool_calls`` (finish reason
    ``tool_calls``), plain text stays content; `required`'s finish reason is ``tool_calls``, a named function's
    ``stop``; streamed, the call's name comes first, then its arguments."""
    from deltaserve.server.protocol.generation import ChatCompletionRequest
    from deltaserve.server.settings import ToolSettings
    from deltaserve.server.tools import ToolCalling

    tools = ToolCalling(ToolSettings(tool_call_parser="hermes", enable_auto_tool_choice=True), zoo_tokenizer)
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>'
    req, out = tools.prepare(ChatCompletionRequest(**base))
    message, finish = out.message(text, [], "stop")
    (call,) = message["tool_calls"]
    assert finish == "tool_calls" and call["function"] == {"name": "f", "arguments": '{"x": 3}'} and call["id"]
    assert out.message("just words", [], "stop") == ({"role": "assistant", "content": "just words"}, "stop")
    tag = json.loads(req.to_sampling_params(8, {}).structured_outputs.structural_tag)
    assert tag["format"]["at_least_one"] is False     # auto: the model decides; a call it starts is constrained
    for choice, want in (("required", "tool_calls"), ({"type": "function", "function": {"name": "f"}}, "stop")):
        req, out = tools.prepare(ChatCompletionRequest(**base, tool_choice=choice))
        tag = json.loads(req.to_sampling_params(8, {}).structured_outputs.structural_tag)
        assert tag["format"]["at_least_one"] is True   # a call is forced
        assert out.message(text, [], "stop")[1] == want
    deltas = [out.delta(0, piece, [], [], None) for piece in ("<tool_call>\n", '{"name": "f", "arguments": ',
                                                              '{"x": 3}', "}\n</tool_call>")]
    calls = [c for d in deltas if d for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "f"
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == {"x": 3}
    assert out.stream_finish(0, "stop") == "stop"    # named: stop, as vLLM


# ---------------------------------------------------------------------------- metrics cardinality

def test_10000_recipes_models_and_experts_make_a_bounded_number_of_series():
    from prometheus_client.parser import text_string_to_metric_families

    from deltaserve.server.metrics import Metrics

    metrics = Metrics(label_values=100)
    for i in range(10_000):
        metrics.count_request(f"expert-{i}", f"0.5*expert-{i}+0.5*expert-{i + 1}", "200")
        metrics.count_route("knn", f"expert-{i}")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    requests = [s for s in families["deltaserve_requests"].samples if s.name.endswith("_total")]
    assert len(requests) == 101 and sum(s.value for s in requests) == 10_000   # nothing is lost, only pooled
    assert sum(s.labels["recipe"] == "other" for s in requests) == 1
    decisions = [s for s in families["deltaserve_route_decisions"].samples if s.name.endswith("_total")]
    assert len(decisions) == 101 and {s.labels["expert"] for s in decisions} >= {"expert-0", "other"}
    off = Metrics(label_values=0)
    off.count_request("m", "r", "200")
    assert 'deltaserve_requests_total{model="other",recipe="other",status="200"} 1.0' in off.render().decode()


def test_following_the_store_reads_only_the_experts_that_changed(micro_zoo, tmp_path, monkeypatch):
    """Every registration is followed by every replica; with 10,000 experts reading (or even statting) every
    expert made that O(store). The journal names what each generation changed and only those are read; without
    a journal position every expert is statted and only new, replaced or unservable ones are read."""
    from deltaserve.server.engine.scan import Followed, follow_store

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    store.import_source("a", micro_zoo.layout.lora("upper"))
    store.import_source("b", micro_zoo.layout.lora("length"))
    (store.root / "junk").mkdir()
    (store.root / "junk" / "manifest.json").write_text("{}")
    first = follow_store(store, Followed(), store.generation())   # no position yet: a full scan
    assert sorted(first.experts) == ["a", "b"] and list(first.unavailable) == ["junk"] and first.cursor
    store.import_source("a", micro_zoo.layout.lora("length"), replace=True)
    store.import_source("c", micro_zoo.layout.lora("upper"))
    store.delete("b")
    store.set_exemplars("c", ["make it upper case"])
    store.set_recipe("bot", "a")
    loads: list[str] = []
    stamped: list[str] = []
    real_load, real_stamp = store.load, store.stamp
    monkeypatch.setattr(store, "load", lambda name, **kw: loads.append(name) or real_load(name, **kw))
    monkeypatch.setattr(store, "stamp", lambda name: stamped.append(name) or real_stamp(name))
    after = follow_store(store, first, store.generation())
    assert sorted(loads) == ["a", "c"] and sorted(set(stamped)) == ["a", "b", "c"]   # nothing else touched
    assert sorted(after.experts) == ["a", "c"] and list(after.unavailable) == ["junk"]
    assert after.experts["a"].digest != first.experts["a"].digest
    monkeypatch.undo()
    store.set_exemplars("a", ["new exemplar"])   # the same version, new exemplars: a new info (routers re-read)
    monkeypatch.setattr(store, "load", lambda name, **kw: loads.append(name) or real_load(name, **kw))
    loads.clear()
    changed = follow_store(store, after, store.generation())
    assert loads == ["a"] and changed.experts["a"] is not after.experts["a"]
    assert changed.experts["a"].token == after.experts["a"].token and changed.experts["c"] is after.experts["c"]
    after = changed
    loads.clear()
    again = follow_store(store, Followed(after.experts, after.unavailable, after.stamps), store.generation())
    assert sorted(loads) == ["junk"] and all(again.experts[n] is after.experts[n] for n in after.experts)


def test_the_journal_names_what_each_generation_changed(tmp_path, monkeypatch):
    """experts.journal: a reader's cursor follows generation by generation; a gap (a generation written without
    the journal), a journal started afresh or a torn line never yield a wrong answer, only a full scan."""
    from deltaserve.experts import journal

    assert journal.changes(tmp_path, None, 0) == (None, None)   # no journal yet
    journal.append(tmp_path, 1, ["a"])
    names, cursor = journal.changes(tmp_path, None, 1)
    assert names is None and cursor.generation == 1   # no position: scan everything, go on from here
    journal.append(tmp_path, 2, ["b", "a"])
    journal.append(tmp_path, 3, [])
    names, later = journal.changes(tmp_path, cursor, 3)
    assert names == {"a", "b"} and later.generation == 3
    journal.append(tmp_path, 4, ["c"])
    assert journal.changes(tmp_path, later, 3) == (set(), later)   # generation 4 is not read yet
    with open(tmp_path / journal.JOURNAL_FILE, "a") as fh:
        fh.write('{"generation": 5, "names": ["d"')   # being appended
    assert journal.changes(tmp_path, later, 4)[0] == {"c"}
    assert journal.changes(tmp_path, later, 5)[0] is None   # generation 5 not complete in the journal
    journal.append(tmp_path, 7, ["e"])    # generation 6 was never journaled
    assert journal.changes(tmp_path, journal.changes(tmp_path, later, 4)[1], 7)[0] is None
    monkeypatch.setattr(journal, "MAX_JOURNAL_BYTES", 0)
    journal.append(tmp_path, 8, ["f"])    # started afresh: old cursors no longer fit
    names, fresh = journal.changes(tmp_path, later, 8)
    assert names is None and journal.changes(tmp_path, fresh, 8) == (set(), fresh)


def test_requests_for_an_adapter_being_built_wait_for_that_build(micro_zoo, tmp_path):
    """Eight requests for one new LoRA recipe at once built it eight times (a registration bench saw 8 builds for
    16 requests of one expert); the first builds, the others wait and count as hits."""
    import time

    from deltaserve.server.engine.lora import LoraAdapters
    from deltaserve.server.engine.types import ExpertInfo, Plan, WeightState
    from deltaserve.server.metrics import Metrics

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    store.import_source("a", micro_zoo.layout.lora("upper"))
    info = ExpertInfo("a", store.load("a").manifest, store.path("a"))
    cache = AdapterCache(tmp_path / "cache", capacity=4)
    built = []

    def slow_build(*args, **kwargs):
        built.append(args[0])
        time.sleep(0.2)
        return AdapterCache.build(cache, *args, **kwargs)
    cache.build = slow_build
    metrics = Metrics()
    adapters = LoraAdapters(cache, metrics, lambda i: store.load(i.name), store.shapes, micro_zoo.layout.base)
    plan = Plan("lora", Recipe((("a", 1.0),)), WeightState(), experts=(info,))

    async def many():
        return await asyncio.gather(*(adapters.acquire(plan, None) for _ in range(8)))
    got = asyncio.run(many())
    assert len(built) == 1 and len({a.lora_id for _, a in got}) == 1 and cache._pins[got[0][1].lora_id] == 8
    assert metrics.cache_hits.labels("device")._value.get() == 7 and metrics.adapter_builds._value.get() == 1
    assert adapters.building == {}


def test_concurrent_callers_share_runs_that_start_after_their_call():
    """server.coalesce: a store rescan or router refit asked for by eight registrations at once runs twice (the
    first caller's, then one shared by everyone who arrived meanwhile), and nobody returns on a run that began
    before its call; a failed run is not shared."""
    from deltaserve.server.coalesce import Coalesced

    runs: list[int] = []   # the number of calls made when each run started
    calls = 0
    shared = Coalesced()

    async def work():
        runs.append(calls)
        await asyncio.sleep(0.05)

    async def caller():
        nonlocal calls
        calls += 1
        mine = calls
        await shared.run(work)
        assert any(started >= mine for started in runs)   # a run that started after this call

    async def scenario():
        await asyncio.gather(*(caller() for _ in range(8)))
        assert runs == [1, 8]

        async def boom():
            raise RuntimeError("scan failed")
        with pytest.raises(RuntimeError):
            await shared.run(boom)
        assert await shared.run(work) is True   # the failure covered nobody
    asyncio.run(scenario())


def test_a_request_planned_after_its_expert_was_deleted_is_a_404(micro_zoo, tmp_path):
    """A chat request resolved its `model` just before the expert was deleted, then planned it: that was a
    KeyError and a 500 (the chaos test's replace-and-delete under load); it is the 404 of a later arrival."""
    from deltaserve.experts.store_errors import UnknownExpertError
    from deltaserve.server.engine.core import Engine
    from deltaserve.server.metrics import Metrics
    from deltaserve.server.settings import EngineConfig

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    engine = Engine(EngineConfig(base_dir=micro_zoo.layout.base, adapter_root=tmp_path / "adapters"), store,
                    Metrics())
    with pytest.raises(UnknownExpertError, match="'gone': deleted while"):
        engine.plan(Recipe((("gone", 1.0),)), arriving=True)
