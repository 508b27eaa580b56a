"""The dashboard and the alert rules against a real Prometheus scraping a real deltaserve.

Prometheus (Debian's ``prometheus`` binary, a subprocess on a free port) scrapes
the session's ``live_server`` every second and loads deploy/prometheus/alerts.yml.
Traffic exercises every serving path (base, dense expert, dense and LoRA
expressions, knn-routed ``auto`` and its out-of-distribution fallback, a 404,
streaming); then every panel query of deploy/grafana/deltaserve.json must return
data through Prometheus' HTTP API, and every alert rule must load and evaluate.
A missing ``prometheus`` binary fails the test; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import LiveServer, free_port

REPO = Path(__file__).resolve().parents[1]
ALERTS_YML = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 1
START_TIMEOUT_S = 30
# Alerts that must stay silent while the server is healthy (the others depend on traffic mix and time).
HEALTH_ALERTS = ("DeltaserveDown", "DeltaserveAbsent", "DeltaserveEngineDown")
LORA_EXPRESSION = "0.5*count-vowels-lora+0.5*max-digit-lora"
ROUTED = {"Uppercase this: quiet river": "upper", "What is the largest digit in 58213?": "max-digit-lora"}
OOD_PROSE = "She painted the fence a cheerful shade of yellow before lunch."


def _load_dashboard_queries():
    """deploy/dashboard_queries.py (deploy/ is not a package), shared with tests/test_deploy_static.py."""
    if "dashboard_queries" in sys.modules:
        return sys.modules["dashboard_queries"]
    spec = importlib.util.spec_from_file_location("dashboard_queries", REPO / "deploy" / "dashboard_queries.py")
    module = sys.modules["dashboard_queries"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dq = _load_dashboard_queries()


class Prometheus:
    """A ``prometheus`` subprocess scraping one deltaserve as job ``deltaserve``, with the deploy alert rules."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": [str(ALERTS_YML)],
            "scrape_configs": [{"job_name": "deltaserve", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        self.wait_for(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, "readiness")

    def api(self, endpoint: str, **params) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=10).json()
        assert body["status"] == "success", (endpoint, params, body)
        return body["data"]

    def instant(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]

    def wait_for(self, condition, what: str):
        """Poll ``condition`` (falsy or a connection error: not yet) until it holds; fail with the log if not."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                result = condition()
                if result:
                    return result
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"prometheus: no {what} after {START_TIMEOUT_S} s; targets: {self._targets()}; "
                    f"log:\n{self.log_path.read_text()[-3000:]}")

    def _targets(self) -> str:
        try:
            return str([(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.api("targets")["activeTargets"]])
        except httpx.HTTPError as err:
            return f"unknown ({err})"

    def scrapes_after(self, moment: float) -> float:
        """Wait for two successful scrapes after ``moment`` (a series born just before it then has 2 samples)."""
        def latest() -> float | None:
            stamps = [float(s["value"][1]) for s in self.instant('timestamp(up{job="deltaserve"} == 1)')]
            return next((t for t in stamps if t > moment + 1.5 * SCRAPE_INTERVAL_S), None)
        return self.wait_for(latest, "successful scrape after the traffic")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus not found: install Debian's 'prometheus' package (`make install` installs it)")
    return binary


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory):
    server = Prometheus(prometheus_binary(), f"127.0.0.1:{live_server.port}", tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- traffic


def _chat(client: httpx.Client, model: str, content: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]})


def drive_traffic(server: LiveServer) -> None:
    """One request down every path the dashboard shows; each is checked so an empty panel points at the dashboard."""
    client = server.client()
    for model, path in (("base", "base"), ("upper", "dense"), (LORA_EXPRESSION, "lora"),
                        ("0.7*upper+0.3*length", "dense"), (LORA_EXPRESSION, "lora")):  # 2nd LoRA: adapter cache hit
        r = _chat(client, model, "Uppercase this: quiet river")
        assert r.status_code == 200 and r.json()["deltaserve"]["path"] == path, (model, r.text)
    r = client.post("/v1/completions", json={"model": "base", "prompt": "Q: x\nA: ", "max_tokens": 3})
    assert r.status_code == 200, r.text
    for question, expert in ROUTED.items():
        r = _chat(client, "auto", question)
        assert r.status_code == 200 and r.headers["x-deltaserve-recipe"] == expert, r.text
    r = _chat(client, "auto", OOD_PROSE)
    assert r.status_code == 200 and r.json()["deltaserve"]["route"]["fallback"] == "out_of_distribution", r.text
    r = _chat(client, "no-such-expert", "hi")
    assert r.status_code == 404, r.text
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "upper", "max_tokens": 4, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Uppercase this: calm sea"}]}) as r:
        body = r.read().decode()
    assert r.status_code == 200 and body.rstrip().endswith("data: [DONE]"), body


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


# ---------------------------------------------------------------- tests


def test_prometheus_is_installed():
    """Fails at once (before any server starts) when the binary is missing; the fixture would only error."""
    assert Path(prometheus_binary()).is_file()


KEY_FILE_PANELS = {"Requests / s by tenant", "Tokens / s by tenant", "Rate-limited requests / s"}


def test_every_dashboard_query_returns_data(live_server, prometheus):
    """Each panel query, with the dashboard's "All" defaults, is non-empty and has a finite value.

    The rate window spans both rounds of traffic (and at least 15 s) and ends at a scrape two
    intervals after the last request, so every rate() sees >= 2 samples and every histogram an
    observation.
    """
    traffic_start = time.time()
    for _ in range(2):  # rate() counts increases between samples: a series born in round 1 rises in round 2
        drive_traffic(live_server)
        last_scrape = prometheus.scrapes_after(time.time())
    window = f"{max(15, math.ceil(last_scrape - traffic_start) + 2 * SCRAPE_INTERVAL_S)}s"

    dashboard = dq.load_dashboard()
    defaults = dq.template_defaults(dashboard)
    queries = dq.panel_queries(dashboard)
    assert len(queries) >= 20
    problems = []
    for query in queries:
        if query.panel in KEY_FILE_PANELS:   # series only a server with --key-file has (tests/test_tenants.py)
            continue
        expr = dq.concrete_expr(query.expr, defaults, rate_range=window)
        result = prometheus.instant(expr, at=last_scrape)
        if not result:
            problems.append(f"{query.panel!r} ({query.ref_id}): no data for {expr}")
        elif not _finite(result):
            problems.append(f"{query.panel!r} ({query.ref_id}): only NaN/Inf {result} for {expr}")
    assert problems == [], "dashboard panels without data:\n" + "\n".join(problems)
    engine = next(q for q in queries if q.panel == "Engine up")
    assert [s["value"][1] for s in prometheus.instant(dq.concrete_expr(engine.expr, defaults))] == ["1"]


def test_alert_rules_load_and_evaluate(prometheus):
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS_YML.read_text())["groups"]
                for rule in group["rules"]}
    assert "DeltaserveEngineDown" in expected

    def evaluated_rules():
        rules = [rule for group in prometheus.api("rules", type="alert")["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None  # unknown: not yet run

    rules = {rule["name"]: rule for rule in prometheus.wait_for(evaluated_rules, "evaluation of every alert rule")}
    assert set(rules) == expected
    unhealthy = {name: (rule["health"], rule.get("lastError")) for name, rule in rules.items()
                 if rule["health"] != "ok"}
    assert unhealthy == {}
    assert {name: rules[name]["state"] for name in HEALTH_ALERTS} == dict.fromkeys(HEALTH_ALERTS, "inactive")
