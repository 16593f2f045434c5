"""Deployment files, checked without a cluster and without the internet:

- the Helm chart is rendered by Helm's own engine (``helm-python-sdk`` ships Helm v4 as a library) for every
  autoscaling mode and Redis option, linted, and every manifest validated (strict: unknown fields fail)
  against the Kubernetes JSON schemas bundled in ``kubernetes-validate`` for the oldest and newest supported
  versions; KEDA objects against the strict KEDA schemas vendored in ``deploy/schemas`` (generated from the
  KEDA models of the PyPI package ``cloudcoil.models.keda``, see ``make_keda_schemas.py``);
- the operational policy holds: probes, resources, non-root read-only containers, PDBs, Redis persistence;
- ``docker-compose.yml`` is validated against the compose-spec schema bundled in ``check-jsonschema``.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from workers.observability.metrics import QUEUE

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "ehr-alerts"
CI_VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "ci-values.yaml").read_text())
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
KEDA_SCHEMAS = {
    kind: json.loads((ROOT / "deploy" / "schemas" / f"keda-{kind.lower()}-v1alpha1.json").read_text())
    for kind in ("ScaledObject", "TriggerAuthentication")
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def render(**extra: Any) -> list[dict[str, Any]]:
    """Every manifest the chart renders with the CI values plus ``extra``."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(_merge(CI_VALUES, extra), name="ehr", namespace="clinical")
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


VARIANTS = {
    "keda": {},
    "hpa": {"autoscaling": {"mode": "hpa"}},
    "fixed": {"autoscaling": {"mode": "none"}, "worker": {"replicas": 3}},
    "managed-redis": {
        "redis": {"enabled": False, "external": {"host": "cache.example.internal", "tls": True, "password": "p@ss"}}
    },
    "existing-secret": {"existingSecret": "ehr-alerts-prod", "secrets": {"logHashKey": ""}, "redis": {"password": ""}},
    "trust-files": {
        "trust": {"jwks": {"epic-jwks.json": '{"keys": []}'}, "caBundle": "-----BEGIN CERTIFICATE-----\n..."},
        "secrets": {"metricsToken": "scrape-me"},
        "api": {"prometheusAnnotations": True},
        "networkPolicy": {"prometheusNamespace": "monitoring"},
    },
    "no-ingress": {"ingress": {"enabled": False, "host": ""}, "networkPolicy": {"enabled": False}},
    "split": {"api": {"split": {"enabled": True, "ingest": {"replicas": 3}}}},
}


def _kinds(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chart_renders_valid_kubernetes_manifests(variant: str):
    docs = render(**VARIANTS[variant])
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] in KEDA_SCHEMAS, doc["kind"]
            jsonschema.validate(doc, KEDA_SCHEMAS[doc["kind"]])
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_keda_schema_is_strict():
    docs = _kinds(render())
    scaled = copy.deepcopy(docs[("ScaledObject", "ehr-ehr-alerts-worker")])
    scaled["spec"]["minReplicas"] = 1  # the field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(scaled, KEDA_SCHEMAS["ScaledObject"])


def test_chart_lints_clean():
    report = helm.lint(str(CHART), CI_VALUES, strict=True)
    assert not report["errors"], report
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_workloads_are_hardened_with_probes_and_resources():
    docs = render()
    workloads = _workloads(docs)
    assert {d["metadata"]["name"] for d in workloads} == {
        "ehr-ehr-alerts-api",
        "ehr-ehr-alerts-worker",
        "ehr-ehr-alerts-redis",
    }
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            assert "livenessProbe" in container, where
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), where
    api = _kinds(docs)[("Deployment", "ehr-ehr-alerts-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=api"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker = _kinds(docs)[("Deployment", "ehr-ehr-alerts-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["livenessProbe"]["exec"]["command"] == ["python", "-m", "workers.observability.alive"]
    assert {"configMapRef", "secretRef"} == {k for ref in worker["envFrom"] for k in ref}


def test_pod_disruption_budgets_cover_api_and_workers():
    docs = render()
    selectors = [
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    ]
    assert sorted(selectors) == ["api", "worker"]


def test_workers_scale_on_the_celery_queue():
    keda = _kinds(render())[("ScaledObject", "ehr-ehr-alerts-worker")]
    trigger = keda["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == QUEUE
    assert keda["spec"]["minReplicaCount"] >= 1  # /readyz needs a worker heartbeat
    from workers.celery_app import app

    assert app.conf.task_default_queue == QUEUE
    hpa = _kinds(render(autoscaling={"mode": "hpa"}))[("HorizontalPodAutoscaler", "ehr-ehr-alerts-worker")]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "ehr_alerts_queue_depth"
    fixed = _kinds(render(autoscaling={"mode": "none"}, worker={"replicas": 3}))
    assert fixed[("Deployment", "ehr-ehr-alerts-worker")]["spec"]["replicas"] == 3
    assert not [k for k in fixed if k[0] in ("ScaledObject", "HorizontalPodAutoscaler")]


def test_bundled_redis_persists_and_never_evicts():
    redis_set = _kinds(render())[("StatefulSet", "ehr-ehr-alerts-redis")]
    args = redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert redis_set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_managed_redis_url_and_no_bundled_redis():
    docs = render(**VARIANTS["managed-redis"])
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    secret = _kinds(docs)[("Secret", "ehr-ehr-alerts-secrets")]
    assert secret["stringData"]["REDIS_URL"] == "rediss://:p%40ss@cache.example.internal:6379/0"


def test_existing_secret_is_used_and_no_secret_rendered():
    docs = render(**VARIANTS["existing-secret"])
    assert not [d for d in docs if d["kind"] == "Secret"]
    api = _kinds(docs)[("Deployment", "ehr-ehr-alerts-api")]["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "ehr-alerts-prod"}} in api["envFrom"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secrets": {"logHashKey": ""}}, "secrets.logHashKey is required"),
        ({"redis": {"password": ""}}, "redis.password is required"),
        ({"autoscaling": {"minReplicas": 0}}, "minReplicas"),
        ({"autoscaling": {"mode": "sometimes"}}, "mode"),
        ({"config": {"LOG_LEVEL": "DEBUG"}}, "LOG_LEVEL"),
        ({"ingress": {"host": ""}}, "ingress.host is required"),
        ({"api": {"prometheusAnnotations": True}}, "metricsToken"),
    ],
)
def test_bad_values_are_refused_with_the_reason(values: dict[str, Any], message: str):
    with pytest.raises(helm.HelmError, match=message):
        render(**values)


def test_config_map_settings_are_known_settings():
    from config.settings import ENV_PREFIX, Settings

    config = _kinds(render())[("ConfigMap", "ehr-ehr-alerts-config")]["data"]
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    Settings(**{k[len(ENV_PREFIX) :].lower(): v for k, v in config.items()})  # values validate


COMPOSE = ROOT / "docker-compose.yml"


def test_compose_file_matches_the_compose_spec():
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_brings_the_same_stack_with_an_optional_flower():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"redis", "api", "worker", "flower"} <= set(services)
    assert services["flower"]["profiles"] == ["flower"]
    assert not services["api"].get("profiles") and not services["worker"].get("profiles")
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    for name in ("api", "worker"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
        assert "healthcheck" in services[name]


# --- issue 12: Ingress with TLS, NetworkPolicy, trust files, metrics token ----------------------------------


def test_ingress_serves_the_api_over_tls_only():
    ingress = _kinds(render())[("Ingress", "ehr-ehr-alerts")]
    assert ingress["spec"]["tls"] == [{"hosts": ["cds.ci.example.org"], "secretName": "ehr-ehr-alerts-tls"}]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "cds.ci.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "ehr-ehr-alerts-api", "port": {"name": "http"}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "10m"
    assert not [d for d in render(**VARIANTS["no-ingress"]) if d["kind"] in ("Ingress", "NetworkPolicy")]


def test_network_policies_let_only_the_ingress_controller_reach_the_api_and_only_the_app_reach_redis():
    docs = _kinds(render())
    api = docs[("NetworkPolicy", "ehr-ehr-alerts-api")]["spec"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    [rule] = api["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    redis = docs[("NetworkPolicy", "ehr-ehr-alerts-redis")]["spec"]
    components = sorted(
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in redis["ingress"][0]["from"]
    )
    assert components == ["api", "worker"] and redis["ingress"][0]["ports"][0]["port"] == "redis"
    worker = docs[("NetworkPolicy", "ehr-ehr-alerts-worker")]["spec"]
    assert worker["policyTypes"] == ["Ingress"] and worker["ingress"] == []
    with_prometheus = _kinds(render(**VARIANTS["trust-files"]))[("NetworkPolicy", "ehr-ehr-alerts-api")]["spec"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in with_prometheus[
        "ingress"
    ][0]["from"]


def test_jwks_and_ca_files_are_mounted_read_only_into_the_api():
    docs = _kinds(render(**VARIANTS["trust-files"]))
    trust = docs[("ConfigMap", "ehr-ehr-alerts-trust")]["data"]
    assert set(trust) == {"epic-jwks.json", "ca.pem"}
    pod = docs[("Deployment", "ehr-ehr-alerts-api")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "trust", "mountPath": "/etc/ehr-alerts/trust", "readOnly": True} in container["volumeMounts"]
    assert {"name": "trust", "configMap": {"name": "ehr-ehr-alerts-trust"}} in pod["volumes"]
    assert {"name": "EHR_ALERTS_JWKS_CA_FILE", "value": "/etc/ehr-alerts/trust/ca.pem"} in container["env"]
    assert docs[("Secret", "ehr-ehr-alerts-secrets")]["stringData"]["EHR_ALERTS_METRICS_TOKEN"] == "scrape-me"
    own = _kinds(render(trust={"existingSecret": "hospital-trust"}))[("Deployment", "ehr-ehr-alerts-api")]
    assert {"name": "trust", "secret": {"secretName": "hospital-trust"}} in own["spec"]["template"]["spec"]["volumes"]
    plain = _kinds(render())[("Deployment", "ehr-ehr-alerts-api")]["spec"]["template"]["spec"]
    assert all(v["name"] != "trust" for v in plain["volumes"])


def test_compose_is_a_local_dev_stack_with_flower_behind_a_password():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    env = services["api"]["environment"]
    assert env["EHR_ALERTS_PROFILE"] == "dev"
    assert "https://sandbox.cds-hooks.org" in env["EHR_ALERTS_CORS_ORIGINS"]
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port  # nothing listens beyond this machine
    flower = " ".join(services["flower"]["command"])
    assert "--basic-auth" in flower and "FLOWER_BASIC_AUTH" in flower and "exit 1" in flower


# --- issue 15: CDS Hooks and ingestion as separate deployments of the same image -----------------------------


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def test_one_api_deployment_serves_every_route_by_default():
    docs = _kinds(render())
    assert _env(docs[("Deployment", "ehr-ehr-alerts-api")])["EHR_ALERTS_API_ROUTES"] == "all"
    assert not [key for key in docs if key[1] == "ehr-ehr-alerts-ingest"]
    [path] = docs[("Ingress", "ehr-ehr-alerts")]["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/"


def test_split_runs_cds_and_ingestion_as_two_deployments_of_the_same_image():
    docs = _kinds(render(**VARIANTS["split"]))
    api, ingest = docs[("Deployment", "ehr-ehr-alerts-api")], docs[("Deployment", "ehr-ehr-alerts-ingest")]
    assert _env(api)["EHR_ALERTS_API_ROUTES"] == "cds" and _env(ingest)["EHR_ALERTS_API_ROUTES"] == "ingest"
    assert ingest["spec"]["replicas"] == 3
    api_pod, ingest_pod = (d["spec"]["template"]["spec"] for d in (api, ingest))
    assert api_pod["containers"][0]["image"] == ingest_pod["containers"][0]["image"]
    assert ingest["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ingest"
    container = ingest_pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=api"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # each Deployment behind its own Service; the ingress sends /fhir to ingestion, everything else to the API
    service = docs[("Service", "ehr-ehr-alerts-ingest")]["spec"]
    assert service["selector"]["app.kubernetes.io/component"] == "ingest"
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for p in docs[("Ingress", "ehr-ehr-alerts")]["spec"]["rules"][0]["http"]["paths"]
    }
    assert paths == {"/fhir": "ehr-ehr-alerts-ingest", "/": "ehr-ehr-alerts-api"}
    # the ingress controller (only) reaches both; both reach Redis; both have a disruption budget
    policy = docs[("NetworkPolicy", "ehr-ehr-alerts-ingest")]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ingest"
    assert policy["ingress"][0]["from"] == docs[("NetworkPolicy", "ehr-ehr-alerts-api")]["spec"]["ingress"][0]["from"]
    redis = docs[("NetworkPolicy", "ehr-ehr-alerts-redis")]["spec"]["ingress"][0]["from"]
    assert sorted(p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in redis) == [
        "api",
        "ingest",
        "worker",
    ]
    assert ("PodDisruptionBudget", "ehr-ehr-alerts-ingest") in docs


def test_compose_has_the_split_shape_as_a_profile():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, routes in (("api-cds", "cds"), ("api-ingest", "ingest")):
        service = services[name]
        assert service["profiles"] == ["split"]
        assert service["environment"]["EHR_ALERTS_API_ROUTES"] == routes
        assert service["environment"]["REDIS_URL"] == services["api"]["environment"]["REDIS_URL"]
        assert service["read_only"] is True and "healthcheck" in service
