"""The Kubernetes manifests (deploy/k8s, applied with `kubectl apply -k deploy/`),
validated against Kubernetes' own schemas, offline (`kubernetes-validate`
ships them), and checked against the experiment config and the rules."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
ARMS = ("baseline", "generic", "finetuned", "ngram")


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = documents()


def find(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in DOCUMENTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("where,doc", DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_manifest_is_valid_against_the_kubernetes_schema(where, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def test_the_validator_rejects_a_misspelt_field():
    deployment = json.loads(json.dumps(find("Deployment", "gateway")))
    container(deployment)["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.utils.latest_version(), strict=True)


def test_kustomization_lists_every_manifest_and_existing_files():
    manifests = {f"k8s/{p.name}" for p in (DEPLOY / "k8s").glob("*.yaml")}
    assert set(KUSTOMIZATION["resources"]) == manifests
    for generator in KUSTOMIZATION["configMapGenerator"]:
        for entry in generator["files"]:
            assert (DEPLOY / entry.split("=")[-1]).is_file(), entry
    rules = {f"prometheus/rules/{p.name}" for p in (DEPLOY / "prometheus" / "rules").glob("*.yml")}
    (rule_map,) = [g for g in KUSTOMIZATION["configMapGenerator"] if g["name"] == "specdrift-prometheus-rules"]
    assert set(rule_map["files"]) == rules


def test_every_referenced_configmap_and_claim_exists():
    generated = {g["name"] for g in KUSTOMIZATION["configMapGenerator"]}
    config_maps = generated | {d["metadata"]["name"] for _, d in DOCUMENTS if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for _, d in DOCUMENTS if d["kind"] == "PersistentVolumeClaim"}
    for _, doc in DOCUMENTS:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for source in container(doc).get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
        assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_is_a_deployment_and_service_serving_its_name(arm):
    deployment, service = find("Deployment", arm), find("Service", arm)
    vllm = container(deployment)
    args = vllm["args"]
    assert flag(args, "served-model-name") == arm
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["specdrift.io/arm"] == arm
    assert pod["metadata"]["labels"]["specdrift.io/scrape-job"] == "vllm-arms"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == flag(args, "port") == "8000"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 8000
    # $(VAR) in args is expanded by Kubernetes from the container's environment.
    models = find("ConfigMap", "specdrift-models")["data"]
    for variable in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert variable in models, f"{arm}: $({variable}) is not in the specdrift-models ConfigMap"
    spec = flag(args, "speculative-config")
    assert (spec is None) == (arm == "baseline")
    if spec:
        expanded = re.sub(r"\$\((\w+)\)", lambda m: models[m[1]], spec)
        assert json.loads(expanded)["num_speculative_tokens"] == int(models["NUM_SPECULATIVE_TOKENS"])
        assert flag(args, "per-request-spec-decode-metrics") == "summary"


def test_gateway_reaches_the_arms_by_their_service_names():
    from core.config import load_config

    config = load_config(DEPLOY / "experiment.compose.yaml")
    services = {d["metadata"]["name"]: d for _, d in DOCUMENTS if d["kind"] == "Service"}
    for arm in config.arms:
        (url,) = arm.upstreams
        host, port = re.match(r"http://([^:/]+):(\d+)$", url).groups()
        assert host in services and services[host]["spec"]["ports"][0]["port"] == int(port)
    gateway = find("Deployment", "gateway")
    command = container(gateway)["command"]
    assert command[:2] == ["specdrift", "gateway"]
    mount = {m["name"]: m["mountPath"] for m in container(gateway)["volumeMounts"]}
    assert command[command.index("--config") + 1] == f"{mount['experiment']}/experiment.compose.yaml"
    assert config.gateway.records_path.startswith(mount["records"] + "/")
    assert gateway["spec"]["replicas"] == 1, "one SQLite writer"
    assert services["gateway"]["spec"]["ports"][0]["port"] == config.ports.gateway


def test_gateway_token_comes_from_a_secret_that_prometheus_sends_too():
    from core.config import load_config

    config = load_config(DEPLOY / "experiment.compose.yaml")
    env = {e["name"]: e for e in container(find("Deployment", "gateway"))["env"]}
    secret = env[config.gateway.auth_token_env]["valueFrom"]["secretKeyRef"]
    prometheus = find("Deployment", "prometheus")
    volume = next(v for v in prometheus["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["name"]
    mount = next(m for m in container(prometheus)["volumeMounts"] if m["name"] == volume["name"])
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.k8s.yml").read_text())["scrape_configs"]
    assert job["authorization"]["credentials_file"] == f"{mount['mountPath']}/{secret['key']}"


# --- the overlay with gateway replicas (deploy/replicas) --------------------------------

REPLICAS = DEPLOY / "replicas"


def apply_json_patch(doc: dict, operations: list[dict]) -> dict:
    """RFC 6902 `add` and `replace`, the operations the overlay uses, as kustomize applies them."""
    doc = json.loads(json.dumps(doc))
    for operation in operations:
        *parents, last = operation["path"].lstrip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if operation["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        elif operation["op"] in ("add", "replace"):
            if operation["op"] == "replace":
                assert (int(last) < len(node)) if isinstance(node, list) else last in node, operation["path"]
            node[int(last) if isinstance(node, list) else last] = operation["value"]
        else:
            raise AssertionError(f"unexpected operation {operation['op']}")
    return doc


def overlay_gateway() -> tuple[dict, list[dict]]:
    kustomization = yaml.safe_load((REPLICAS / "kustomization.yaml").read_text())
    (patch,) = kustomization["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "gateway"}
    operations = yaml.safe_load((REPLICAS / patch["path"]).read_text())
    return apply_json_patch(find("Deployment", "gateway"), operations), operations


def test_replicas_overlay_builds_on_the_base_and_lists_existing_files():
    kustomization = yaml.safe_load((REPLICAS / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == KUSTOMIZATION["namespace"]
    assert "../" in kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (REPLICAS / resource).exists(), resource
    for doc in yaml.safe_load_all((REPLICAS / "postgres.yaml").read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def test_the_patch_helper_refuses_to_replace_what_is_not_there():
    with pytest.raises(AssertionError):
        apply_json_patch({"spec": {"volumes": [{"name": "a"}]}},
                         [{"op": "replace", "path": "/spec/volumes/1", "value": {"name": "b"}}])


def test_replicas_overlay_runs_two_gateways_on_one_postgres_with_the_password_from_a_secret():
    gateway, operations = overlay_gateway()
    kubernetes_validate.validate(gateway, kubernetes_validate.utils.latest_version(), strict=True)
    assert gateway["spec"]["replicas"] == 2
    # Index-based paths: they must still point at what the patch means to change.
    base_pod = find("Deployment", "gateway")["spec"]["template"]["spec"]
    replaced = [op["path"] for op in operations if op["op"] == "replace" and "/volumes/" in op["path"]]
    for path in replaced:
        assert base_pod["volumes"][int(path.rsplit("/", 1)[1])]["name"] == "records"
    assert container(find("Deployment", "gateway"))["name"] == "gateway"
    pod = gateway["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"]), "a ReadWriteOnce claim holds one pod"
    gateway_container = container(gateway)
    url = urlsplit(flag(gateway_container["command"], "records"))
    assert url.scheme == "postgresql" and url.password is None
    postgres_docs = {d["kind"]: d for d in yaml.safe_load_all((REPLICAS / "postgres.yaml").read_text())}
    service, statefulset = postgres_docs["Service"], postgres_docs["StatefulSet"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    postgres = container(statefulset)
    postgres_env = {e["name"]: e for e in postgres["env"]}
    assert url.username == postgres_env["POSTGRES_USER"]["value"] and url.path == "/" + postgres_env["POSTGRES_DB"]["value"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    env = {e["name"]: e for e in gateway_container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == postgres_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert env["SPECDRIFT_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (data,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in postgres["volumeMounts"]}[data["metadata"]["name"]] == \
        "/var/lib/postgresql/data"
    assert postgres_env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
