"""The chart's inference-gateway objects (InferencePool, InferenceObjective, InferenceModelRewrite) validated
strictly against the vendored CRDs, lined up with the Deployment; and deploy/gateway/llm-d-router-values.yaml's
endpoint-picker config lined up with the chart and with the metric names /metrics serves."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from deltaserve.server import metrics
from tests.test_deploy_helm import (FULLNAME, RELEASE, REPO, by_kind, chart, one, render, server_container,  # noqa: F401
                                    validate)

ROUTER_VALUES = REPO / "deploy" / "gateway" / "llm-d-router-values.yaml"
GATEWAY = {"inferencePool": {
    "enabled": True,
    "objectives": [{"name": "interactive", "priority": 10}, {"name": "batch", "priority": -10}],
    "modelRewrites": [{"name": "support", "rules": [{"model": "support", "targets": [
        {"modelRewrite": "support-bot", "weight": 90}, {"modelRewrite": "0.5*tone+0.5*sql", "weight": 10}]}]}]}}


@pytest.fixture(scope="module")
def docs(chart):  # noqa: F811 - the chart fixture imported above
    return render(chart, GATEWAY)


def test_gateway_objects_validate_against_the_vendored_crds(docs):
    kinds = by_kind(docs)
    assert len(kinds["InferencePool"]) == 1 and len(kinds["InferenceObjective"]) == 2
    assert len(kinds["InferenceModelRewrite"]) == 1
    for doc in docs:
        validate(doc)


def test_crd_validation_of_the_pool_can_fail(docs):
    pool = copy.deepcopy(one(docs, "InferencePool"))
    pool["spec"]["targetPorts"] = [{"port": 8000}]
    with pytest.raises(jsonschema.ValidationError):
        validate(pool)
    rewrite = copy.deepcopy(one(docs, "InferenceModelRewrite"))
    rewrite["spec"]["rules"][0]["targets"][0]["weight"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate(rewrite)


def test_pool_selects_the_replicas_on_the_server_port(docs):
    pool = one(docs, "InferencePool")["spec"]
    template = one(docs, "Deployment")["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    port = next(p for p in server_container(docs)["ports"] if p["name"] == "http")["containerPort"]
    assert pool["targetPorts"] == [{"number": port}]
    assert pool["endpointPickerRef"] == {"name": f"{RELEASE}-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}
    assert template["metadata"]["labels"]["llm-d.ai/engine-type"] == "deltaserve"
    assert not [a for a in server_container(docs)["args"] if a.startswith("--ops-need-key")]   # the EPP scrapes
    for doc in by_kind(docs)["InferenceObjective"] + by_kind(docs)["InferenceModelRewrite"]:
        assert doc["spec"]["poolRef"]["name"] == one(docs, "InferencePool")["metadata"]["name"] == FULLNAME


def test_off_by_default(chart):  # noqa: F811
    kinds = by_kind(render(chart))
    assert not {"InferencePool", "InferenceObjective", "InferenceModelRewrite"} & set(kinds)
    labels = one(render(chart), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "deltaserve"


def picker_config() -> tuple[dict, dict]:
    values = yaml.safe_load(ROUTER_VALUES.read_text())["router"]
    epp = values["epp"]
    return values, yaml.safe_load(epp["pluginsCustomConfig"][epp["pluginsConfigFile"]])


def test_router_values_match_the_chart_and_the_metrics(docs):
    values, config = picker_config()
    pool = one(docs, "InferencePool")["spec"]
    assert values["modelServers"]["matchLabels"] == pool["selector"]["matchLabels"]
    assert values["modelServers"]["targetPorts"] == pool["targetPorts"]
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    label = extractor["engineLabelKey"]
    engine = next(e for e in extractor["engineConfigs"]
                  if e["name"] == one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"][label])
    assert engine["queuedRequestsSpec"] == metrics.WAITING and engine["runningRequestsSpec"] == metrics.RUNNING
    assert engine["loraSpec"] == metrics.RECIPES_INFO
    assert engine["kvUsageSpec"] == "vllm:kv_cache_usage_perc"   # vLLM's own, passed on by /metrics
    weights = {p["pluginRef"]: p.get("weight") for p in config["schedulingProfiles"][0]["plugins"]}
    # residency (1.0 vs 0.8 for a free slot) outweighs any queue difference (min-max normalised: worth its weight)
    assert 0.2 * weights["lora-affinity-scorer"] > weights["queue-scorer"]
    assert all(ref in plugins for ref in weights)


def test_helm_lint_strict_is_clean_with_the_gateway_on():
    import helm_python

    from tests.test_deploy_helm import CHART, KUBE_VERSION

    report = helm_python.lint(CHART, GATEWAY, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
