"""Soak: many clients, mixed recipes, cancellations, expert churn — and with ``--tenants``, two tenants behind
scoped keys with limits.

    .venv/bin/python -m bench.reliability.soak --clients 64 --seconds 3600 --tenants \
        --out results/reliability/soak-tenants.json

Starts a real ``deltaserve serve`` on the zoo (LoRA and dense experts, ``--router``), then ``--clients``
concurrent clients loop over a traffic mix: base, single and mixed LoRA recipes, single and mixed dense recipes,
a TIES merge, ``auto``, streamed requests (some cancelled after the first chunk) and a share of bad requests.
Every ``--churn-s`` an expert is registered and, half a period later, deleted while clients use it.

With ``--tenants`` the server runs with a key file (docs/tenants.md): the zoo's experts are public, clients
alternate between tenants ``acme`` and ``globex``, each tenant's admin registers and deletes its own hot expert
(``acme.hot`` / ``globex.hot``) that only its clients call, every client also asks for the *other* tenant's hot
expert (it must be a 404, never a 200: an isolation violation is counted), and one extra client uses a key
limited to ``--limited-rpm`` requests per minute (its 429s are expected and counted apart).

Every ``--sample-s`` it records the server's RSS (with the engine's processes) and the window's latency p50/p99
of the 200s; writes the curve to the JSON and a plot (``--plot``). The plateau figure is the RSS growth over
the run's second half.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.common import log, p99, provenance, scrape, seed_store
from bench.servers import start_server, stop_server
from deltaserve.experts.sources import Compression
from deltaserve_zoo.build import ZooLayout
from deltaserve_zoo.tasks import get_task

QUESTION = [{"role": "user", "content": "How many vowels are in: banana split"}]
HOT = "hot-lora"
MIX = [  # (weight, model, stream, cancel); HOT is the caller's own hot expert, OTHER the other tenant's
    (3, "base", False, False), (4, "count-vowels-lora", False, False), (3, "max-digit-lora", True, False),
    (3, "0.5*count-vowels-lora+0.5*max-digit-lora", False, False), (3, "upper", False, False),
    (2, "0.7*upper+0.3*length", False, False), (1, "ties(density=0.3):upper+length", False, False),
    (3, "auto", False, False), (2, "count-vowels-lora", True, True), (2, HOT, False, False),
    (1, "no-such-expert", False, False), (1, "0.5*upper+", False, False),
]
OTHER = "other-tenant-hot"
TENANTS = ("acme", "globex")


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)     # 200s, whole run
    window: list[float] = field(default_factory=list)        # 200s since the last sample
    isolation_violations: int = 0
    limited: Counter = field(default_factory=Counter)        # the rate-limited client's statuses
    events: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


async def one(client: httpx.AsyncClient, model: str, stream: bool, cancel: bool) -> tuple[int, float]:
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": stream}
    started = time.perf_counter()
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, time.perf_counter() - started
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for _ in r.aiter_lines():
            if cancel:
                return 499, time.perf_counter() - started      # the client went away mid-stream
    return r.status_code, time.perf_counter() - started


def _model(model: str, tenant: str | None) -> str:
    if tenant is None:
        return model
    other = TENANTS[1 - TENANTS.index(tenant)]
    return {HOT: f"{tenant}.hot", OTHER: f"{other}.hot"}.get(model, model)


async def client_loop(url: str, deadline: float, seed: int, tally: Tally, key: str | None,
                      tenant: str | None) -> None:
    rng = random.Random(seed)
    mix = MIX + ([(1, OTHER, False, False)] if tenant else [])
    weights = [w for w, *_ in mix]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        while time.monotonic() < deadline:
            _, model, stream, cancel = rng.choices(mix, weights)[0]
            try:
                status, seconds = await one(client, _model(model, tenant), stream, cancel)
            except httpx.HTTPError as err:
                status, seconds = f"error:{type(err).__name__}", 0.0
            tally.statuses[str(status)] += 1
            if model == OTHER and status != 404:
                tally.isolation_violations += 1
            if status == 200:
                tally.latencies.append(seconds)
                tally.window.append(seconds)


async def limited_loop(url: str, deadline: float, key: str, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300, headers={"authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < deadline:
            r = await client.get("/v1/models")
            tally.limited[str(r.status_code)] += 1
            await asyncio.sleep(float(r.headers.get("retry-after", 0)) / 10 if r.status_code == 429 else 0.2)


async def churn(url: str, source: Path, deadline: float, period: float, keys: dict, tally: Tally,
                uploads: Path) -> None:
    """Register a hot expert, delete it half a period later; alternate tenants (or the one HOT name)."""
    started, turn = time.monotonic(), 0
    while time.monotonic() + period < deadline:
        tenant = TENANTS[turn % 2] if keys else None
        name = f"{tenant}.hot" if tenant else HOT
        headers = {"authorization": f"Bearer {keys[tenant + '-admin']}"} if tenant else {}
        path = uploads / tenant / "hot" if tenant else source
        async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as admin:
            r = await admin.post("/v1/experts", json={"name": name, "path": str(path)})
            tally.events.append({"at_s": round(time.monotonic() - started), "event": f"register {name}",
                                 "status": r.status_code})
            await asyncio.sleep(period / 2)
            r = await admin.delete(f"/v1/experts/{name}")
            tally.events.append({"at_s": round(time.monotonic() - started), "event": f"delete {name}",
                                 "status": r.status_code})
        await asyncio.sleep(period / 2)
        turn += 1


async def sampler(pid: int, deadline: float, every: float, tally: Tally) -> None:
    started = time.monotonic()
    while True:
        window, tally.window = tally.window, []
        tally.curve.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss_mb(pid), 1),
                            "requests_200": len(window),
                            "p50_s": round(statistics.median(window), 4) if window else None,
                            "p99_s": round(p99(window), 4) if window else None})
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


async def soak(url: str, pid: int, args: argparse.Namespace, keys: dict) -> dict:
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    source = args.zoo / "experts" / "lora" / "min_digit"   # a tenant's: <uploads>/<tenant>/hot
    loops = [client_loop(url, deadline, i, tally, keys.get(TENANTS[i % 2]), TENANTS[i % 2] if keys else None)
             for i in range(args.clients)]
    if keys:
        loops.append(limited_loop(url, deadline, keys["limited"], tally))
    await asyncio.gather(churn(url, source, deadline, args.churn_s, keys, tally, args.uploads),
                         sampler(pid, deadline, args.sample_s, tally), *loops)
    return summary(tally)


def summary(tally: Tally) -> dict:
    curve = tally.curve
    half = next((c for c in curve if c["t_s"] >= curve[-1]["t_s"] / 2), curve[0])
    five_xx = sum(n for s, n in tally.statuses.items() if s.startswith("5") or s.startswith("error"))
    return {"statuses": dict(sorted(tally.statuses.items())), "requests": sum(tally.statuses.values()),
            "five_xx": five_xx, "isolation_violations": tally.isolation_violations,
            "limited_client": dict(sorted(tally.limited.items())), "events": tally.events,
            "latency_s": {"p50": statistics.median(tally.latencies) if tally.latencies else None,
                          "p99": p99(tally.latencies) if tally.latencies else None},
            "rss_growth_second_half": round(curve[-1]["rss_mb"] / half["rss_mb"] - 1, 4), "curve": curve}


def key_file(path: Path, limited_rpm: int) -> dict[str, str]:
    """Keys for two tenants (inference and admin each), a rate-limited globex key and a global admin."""
    from deltaserve.server.tenants import hash_key, new_key

    keys, lines = {}, ['public = ["*-lora", "upper", "length"]']
    roles = [(t, t, "inference", 0) for t in TENANTS] + [(f"{t}-admin", t, "admin", 0) for t in TENANTS]
    for who, tenant, role, rpm in [*roles, ("limited", "globex", "inference", limited_rpm),
                                   ("ops", None, "global_admin", 0)]:
        key, key_id = new_key()
        keys[who] = key
        lines += ["[[keys]]", f'id = "{key_id}"', f'hash = "{hash_key(key)}"', f'role = "{role}"', f"rpm = {rpm}",
                  *([f'tenant = "{tenant}"'] if tenant else [])]
    path.write_text("\n".join(lines) + "\n")
    return keys


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    minutes = [c["t_s"] / 60 for c in curve]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(minutes, [c["rss_mb"] / 1024 for c in curve])
    top.set_ylabel("server + engine RSS (GiB)")
    top.set_title(f"soak: {result['clients']} clients, router {result['router']}"
                  f"{', two tenants' if result['tenants'] else ''}; 5xx: {result['five_xx']}")
    bottom.plot(minutes, [c["p99_s"] for c in curve], label="p99")
    bottom.plot(minutes, [c["p50_s"] for c in curve], label="p50")
    bottom.set_ylabel("latency of 200s per window (s)")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".cache/zoo/micro"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--router", choices=["knn", "gate", "uncertainty"], default="knn")
    parser.add_argument("--tenants", action="store_true", help="two tenants behind a key file, with limits")
    parser.add_argument("--limited-rpm", type=int, default=30)
    parser.add_argument("--churn-s", type=float, default=120.0, help="register/delete period")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    record = provenance(argv=argv)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    tasks = ["count_vowels", "max_digit", "upper", "length"]
    full = {"": Compression(method="magnitude", density=0.2)}
    seed_store(args.zoo, tmp / "store", tasks, full=full,
               lora_exemplars=lambda t: [e.question for e in get_task(t).examples("calib", 24, seed=1)])
    keys = key_file(tmp / "keys.toml", args.limited_rpm) if args.tenants else {}
    for tenant in TENANTS if keys else ():   # tenants register from their own upload folders (docs/tenants.md)
        shutil.copytree(args.zoo / "experts" / "lora" / "min_digit", tmp / "uploads" / tenant / "hot")
    extra = ["--router", args.router, "--register-root", str(args.zoo), "--register-root", str(tmp / "uploads")]
    extra += ["--key-file", str(tmp / "keys.toml")] if keys else []
    server, url = start_server(ZooLayout(args.zoo).base, tmp / "store", tmp / "server.log", extra)
    ops = {"authorization": f"Bearer {keys['ops']}"} if keys else {}
    try:
        log(f"soak: {args.clients} clients for {args.seconds:.0f} s against {url} (router {args.router})")
        args.uploads = tmp / "uploads"
        result = asyncio.run(soak(url, server.proc.pid, args, keys))
        metrics = scrape(url, headers=ops)
        result.update(engine_restarts=metrics.get("deltaserve_engine_restarts_total", 0.0),
                      healthy_after=httpx.get(url + "/health", timeout=30).status_code == 200,
                      clients=args.clients, seconds=args.seconds, router=args.router, tenants=args.tenants)
    finally:
        stop_server(server)
    out = {**record, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(out, args.plot)
    log(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    return out


if __name__ == "__main__":
    main()
