"""helm/deltaserve rendered by real Helm (helm-python-sdk, Helm v4 Go SDK) and schema-checked.

Built-in kinds are validated with kubernetes-validate against Kubernetes 1.30 in
strict mode (unknown fields are errors). ServiceMonitor and PrometheusRule are
CRDs that kubernetes-validate does not bundle: they are validated against the
Prometheus Operator CRDs' own openAPIV3Schema (vendored in deploy/schemas/),
made strict the same way (unknown fields are errors).
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "deltaserve"
SCHEMAS = REPO / "deploy" / "schemas"
KUBE_VERSION = "1.30"
OPERATOR_API = "monitoring.coreos.com/v1"
RELEASE, NAMESPACE = "ds", "ml"
FULLNAME = f"{RELEASE}-deltaserve"


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def ha_values() -> dict:
    return yaml.safe_load((CHART / "values-gpu-ha.yaml").read_text())


def render(chart, values: dict | None = None, api_versions: tuple[str, ...] = ()) -> list[dict]:
    """Every object the chart renders (NOTES.txt excluded), offline.

    ``Chart.render`` has no option for the capabilities, so this goes one level
    down to the same C call with ``kube_version`` and ``api_versions`` set, as
    `helm template --kube-version --api-versions` does.
    """
    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True,
            "kube_version": f"v{KUBE_VERSION}.0", "api_versions": list(api_versions)}
    rendered = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)))
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def notes(chart, values: dict | None = None) -> str:
    rendered = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def strict_crd_schema(crd_file: Path, version_name: str = "v1") -> dict:
    """A CRD's openAPIV3Schema where objects reject unknown fields (as `kubectl --validate=strict`)."""
    crd = yaml.safe_load(crd_file.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == version_name)
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server, not the CRD
    return schema


CRD_SCHEMAS = {   # apiVersion -> kind -> the vendored CRD (deploy/schemas/README.md says where each comes from)
    OPERATOR_API: {"ServiceMonitor": SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml",
                   "PrometheusRule": SCHEMAS / "monitoring.coreos.com_prometheusrules.yaml"},
    "inference.networking.k8s.io/v1": {"InferencePool": SCHEMAS / "inference.networking.k8s.io_inferencepools.yaml"},
    "llm-d.ai/v1alpha2": {"InferenceObjective": SCHEMAS / "llm-d.ai_inferenceobjectives.yaml",
                          "InferenceModelRewrite": SCHEMAS / "llm-d.ai_inferencemodelrewrites.yaml"},
}


def validate(doc: dict) -> None:
    if doc["apiVersion"] in CRD_SCHEMAS:
        crd = CRD_SCHEMAS[doc["apiVersion"]][doc["kind"]]
        schema = strict_crd_schema(crd, doc["apiVersion"].rsplit("/", 1)[1])
        jsonschema.Draft7Validator(schema).validate(doc)
        name = doc["metadata"]["name"]
        assert name and len(name) <= 253 and name == name.lower()
    else:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


SETUPS = {
    "default": ({}, ()),
    "gpu-ha": (None, (OPERATOR_API,)),  # None: values-gpu-ha.yaml
    "hostPath-existingSecret": ({"baseModel": {"source": "hostPath", "hostPath": {"path": "/srv/base"}},
                                 "auth": {"existingSecret": "my-keys"}, "store": {"existingClaim": "shared"},
                                 "server": {"registerRoots": ["/incoming"]},
                                 "extraVolumes": [{"name": "incoming",
                                                   "persistentVolumeClaim": {"claimName": "uploads"}}],
                                 "extraVolumeMounts": [{"name": "incoming", "mountPath": "/incoming",
                                                        "readOnly": True}]},
                                ()),
    "keyFile": ({"auth": {"keyFileSecret": "tenant-keys"}, "serviceMonitor": {"enabled": True}}, (OPERATOR_API,)),
    "initCopy-no-auth": ({"baseModel": {"source": "initCopy", "initCopy": {"image": "reg/base-model:1"}},
                          "auth": {"create": False}, "server": {"cacheBytes": 4294967296, "maxWaitMs": 200}}, ()),
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request, chart):
    values, api_versions = SETUPS[request.param]
    values = ha_values() if values is None else values
    return request.param, values, render(chart, values, api_versions)


# ---------------------------------------------------------------- lint, schema, validity


@pytest.mark.parametrize("values_file", [None, "values-gpu-ha.yaml"])
def test_helm_lint_strict_is_clean(values_file):
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_values_schema_accepts_shipped_values_and_rejects_bad_ones(chart):
    chart.validate_schema(chart.values)
    chart.validate_schema(chart.merge_values(ha_values()))
    for bad in ({"server": {"router": "random"}}, {"server": {"routerEncoder": "bert"}},
                {"baseModel": {"source": "s3"}}, {"gpu": {"count": 0}}, {"replicas": 3}):
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))


def test_every_rendered_object_is_valid(setup):
    _, _, docs = setup
    assert docs
    for doc in docs:
        validate(doc)


def test_crd_validation_can_fail(chart):
    monitor = one(render(chart, ha_values(), (OPERATOR_API,)), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_public_render_api_agrees(chart):
    """The capability-aware render helper gives what Chart.render gives (random keys aside)."""
    public = chart.render(values={}, name=RELEASE, namespace=NAMESPACE)
    docs = [doc for path, text in sorted(public.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
    ours = render(chart)
    assert [d["kind"] for d in docs] == [d["kind"] for d in ours]
    assert one(docs, "Deployment") == one(ours, "Deployment")


# ---------------------------------------------------------------- what gets rendered


def test_default_objects(chart):
    kinds = by_kind(render(chart))
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Pod", "Secret",
                             "Service", "ServiceAccount"]


def test_gpu_ha_objects(chart):
    kinds = by_kind(render(chart, ha_values(), (OPERATOR_API,)))
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "ServiceMonitor",
            "PrometheusRule"} <= set(kinds)


def test_operator_objects_need_the_operator_api(chart):
    kinds = by_kind(render(chart, ha_values()))
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    assert "monitoring.coreos.com/v1 API is not installed" in notes(chart, ha_values())


def test_probes_on_health(setup):
    _, _, docs = setup
    container = server_container(docs)
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300


def test_server_args_match_mounts(setup):
    name, values, docs = setup
    container = server_container(docs)
    args = container["args"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert args[0] == "serve"
    assert f"--base={mounts['base-model']['mountPath']}" in args and mounts["base-model"]["readOnly"]
    assert f"--store={mounts['store']['mountPath']}" in args
    assert "--port=8000" in args and "--store-poll-s=5" in args and "--router=knn" in args
    assert "--router-encoder=minilm" in args
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DELTASERVE_CACHE_DIR"] == mounts["store"]["mountPath"] + "/.cache"   # a volume the server writes
    if name == "initCopy-no-auth":
        assert "--cache-bytes=4294967296" in args and "--max-wait-ms=200" in args
    else:
        assert not [a for a in args if a.startswith(("--cache-bytes", "--max-wait-ms"))]
    if name == "hostPath-existingSecret":
        # Registration by path reads a directory that is mounted in the pod.
        assert "--register-root=/incoming" in args and mounts["incoming"]["mountPath"] == "/incoming"
        volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"name": "incoming", "persistentVolumeClaim": {"claimName": "uploads"}} in volumes
    else:
        assert not [a for a in args if a.startswith("--register-root")]


def test_pods_run_as_non_root(setup):
    _, _, docs = setup
    for pod_spec in [one(docs, "Deployment")["spec"]["template"]["spec"], one(docs, "Pod")["spec"]]:
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["securityContext"]["runAsUser"] == 10001
        for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}


def test_api_keys_come_from_the_secret(setup):
    name, _, docs = setup
    server_refs = secret_refs(server_container(docs))
    test_refs = secret_refs(one(docs, "Pod")["spec"]["containers"][0])
    if name == "initCopy-no-auth":
        assert server_refs == {} and test_refs == {} and "Secret" not in by_kind(docs)
        return
    if name == "keyFile":   # scoped keys: the key file mounted from its Secret; probes and scrapes use a global admin
        server = server_container(docs)
        assert server_refs == {} and "Secret" not in by_kind(docs)
        assert test_refs == {"DELTASERVE_API_KEY": ("tenant-keys", "global-admin-key")}
        assert "--key-file=/etc/deltaserve/keys/keys.toml" in server["args"]
        assert {"name": "key-file", "mountPath": "/etc/deltaserve/keys", "readOnly": True} in server["volumeMounts"]
        volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"name": "key-file", "secret": {"secretName": "tenant-keys",
                                               "items": [{"key": "keys.toml", "path": "keys.toml"}]}} in volumes
        endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
        assert endpoint["authorization"] == {"type": "Bearer",
                                             "credentials": {"name": "tenant-keys", "key": "global-admin-key"}}
        return
    secret_name = "my-keys" if name == "hostPath-existingSecret" else f"{FULLNAME}-auth"
    assert server_refs == {"DELTASERVE_API_KEY": (secret_name, "api-key"),
                           "DELTASERVE_ADMIN_KEY": (secret_name, "admin-key")}
    assert test_refs == {"DELTASERVE_API_KEY": (secret_name, "api-key")}
    if name == "hostPath-existingSecret":
        assert "Secret" not in by_kind(docs)
    else:
        data = one(docs, "Secret")["data"]
        keys = {k: base64.b64decode(v).decode() for k, v in data.items()}
        assert set(keys) == {"api-key", "admin-key"} and keys["api-key"] != keys["admin-key"]
        assert all(len(k) == 40 for k in keys.values())


def test_given_api_keys_are_stored(chart):
    docs = render(chart, {"auth": {"apiKey": "sk-inference", "adminKey": "sk-admin"}})
    data = one(docs, "Secret")["data"]
    assert base64.b64decode(data["api-key"]) == b"sk-inference"
    assert base64.b64decode(data["admin-key"]) == b"sk-admin"


def test_gpu_requests(chart):
    ha = server_container(render(chart, ha_values()))
    for section in ("requests", "limits"):
        assert ha["resources"][section]["nvidia.com/gpu"] == 1
    assert ha["image"] == "deltaserve:0.1.0-gpu"
    assert "--gpu-memory-utilization=0.9" in ha["args"] and "--max-model-len=4096" in ha["args"]
    assert not [a for a in ha["args"] if a.startswith("--kv-cache-gib")]
    cpu = server_container(render(chart))
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert cpu["image"] == "deltaserve:0.1.0-cpu"
    assert "--kv-cache-gib=2" in cpu["args"]
    assert not [a for a in cpu["args"] if a.startswith(("--gpu-memory-utilization", "--max-model-len"))]
    two = server_container(render(chart, {"gpu": {"enabled": True, "count": 2}}))
    assert two["resources"]["limits"]["nvidia.com/gpu"] == 2 and two["resources"]["limits"]["memory"] == "16Gi"
    # the base sharded over every GPU of the replica
    assert "--tensor-parallel-size=2" in two["args"] and "--tensor-parallel-size=1" in ha["args"]
    assert not [a for a in cpu["args"] if a.startswith("--tensor-parallel-size")]


def test_base_model_sources(setup):
    name, _, docs = setup
    pod_spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod_spec["volumes"] if v["name"] == "base-model")
    if name == "hostPath-existingSecret":
        assert volume["hostPath"] == {"path": "/srv/base", "type": "Directory"}
    elif name == "initCopy-no-auth":
        assert "emptyDir" in volume
        init = pod_spec["initContainers"][0]
        assert init["image"] == "reg/base-model:1"
        assert init["volumeMounts"] == [{"name": "base-model", "mountPath": "/models/base"}]
    else:
        assert volume["persistentVolumeClaim"] == {"claimName": "deltaserve-base", "readOnly": True}


@pytest.mark.parametrize("values, message", [
    ({"baseModel": {"pvc": {"claimName": ""}}}, "baseModel.pvc.claimName is required"),
    ({"baseModel": {"source": "hostPath"}}, "baseModel.hostPath.path is required"),
    ({"baseModel": {"source": "initCopy"}}, "baseModel.initCopy.image is required"),
])
def test_missing_base_model_settings_fail_with_a_reason(chart, values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render(chart, values)


def test_store_is_a_shared_claim_that_outlives_the_release(chart):
    docs = render(chart)
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    store = next(v for v in volumes if v["name"] == "store")
    assert store["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    existing = render(chart, {"store": {"existingClaim": "shared"}})
    assert "PersistentVolumeClaim" not in by_kind(existing)


def test_selectors_and_references_line_up(chart):
    docs = render(chart, ha_values(), (OPERATOR_API,))
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0] == {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 8)
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == "http" and monitor["endpoints"][0]["path"] == "/metrics"
    relabel_job = {"action": "replace", "targetLabel": "job", "replacement": "deltaserve"}
    assert relabel_job in monitor["endpoints"][0]["relabelings"]
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert server_container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_without_hpa_the_deployment_sets_replicas(chart):
    assert one(render(chart, {"replicaCount": 2}), "Deployment")["spec"]["replicas"] == 2


def test_helm_test_hook_lists_models(chart):
    pod = one(render(chart), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    container = pod["spec"]["containers"][0]
    assert '"/v1/models"' in container["args"][0] and "Authorization" in container["args"][0]
    compile(container["args"][0], "helm-test", "exec")  # the embedded script is valid Python
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DELTASERVE_URL"] == f"http://{FULLNAME}:8000"


# ---------------------------------------------------------------- dashboard and alerts in the chart


def test_dashboard_configmap_for_the_grafana_sidecar(chart):
    configmap = one(render(chart), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["deltaserve.json"]) == json.loads(
        (REPO / "deploy" / "grafana" / "deltaserve.json").read_text())
    assert "ConfigMap" not in by_kind(render(chart, {"grafanaDashboard": {"enabled": False}}))


def test_chart_copies_are_identical_to_deploy():
    deploy_dashboards = {p.name: p.read_bytes() for p in (REPO / "deploy" / "grafana").glob("*.json")}
    chart_dashboards = {p.name: p.read_bytes() for p in (CHART / "dashboards").glob("*.json")}
    assert chart_dashboards == deploy_dashboards, "copy deploy/grafana/*.json to helm/deltaserve/dashboards/"
    deploy_alerts = (REPO / "deploy" / "prometheus" / "alerts.yml").read_bytes()
    assert (CHART / "files" / "alerts.yml").read_bytes() == deploy_alerts, \
        "copy deploy/prometheus/alerts.yml to helm/deltaserve/files/alerts.yml"


def test_prometheus_rule_carries_the_alert_file(chart):
    rule = one(render(chart, ha_values(), (OPERATOR_API,)), "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
