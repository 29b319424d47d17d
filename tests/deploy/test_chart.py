"""The Helm chart: lint, render, validate offline, and build the Serve app from what it renders."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_support import REPO, documents, kuberay_crd, one, profile_values, render

from zimage_platform.config import PlatformConfig, PoolConfig

PROFILES = render.PROFILES
#: Kinds whose schema is not built into Kubernetes (validated elsewhere in this file).
CUSTOM_KINDS = {"RayService", "ServiceMonitor"}


# -- helpers --------------------------------------------------------------------------------


def _crd_schema_node(node: Any) -> Any:
    """An openAPIV3Schema node as strict JSON Schema: int-or-string accepts both, and objects
    refuse unknown fields (kubectl's default strict field validation does, the CRD alone prunes)."""
    if isinstance(node, list):
        return [_crd_schema_node(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _crd_schema_node(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """The KubeRay operator's own schema (served version v1) for ``kind``."""
    crd = kuberay_crd(kind)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_crd_schema_node(version["schema"]["openAPIV3Schema"]))


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template an object carries."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Pod":
        return [("pod", spec)]
    if kind == "Job":
        return [("job", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("cronjob", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayService":
        cluster = spec["rayClusterConfig"]
        pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        return pods + [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return []


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def rendered_platform(serve: dict[str, Any]) -> dict[str, Any]:
    """The platform config of the rendered Serve app (variant specs not given inline are the ones
    packaged with the platform, as in the image)."""
    (app,) = serve["applications"]
    return copy.deepcopy(app["args"]["config"])


def platform_from(serve: dict[str, Any]) -> PlatformConfig:
    """The rendered platform config, as the replicas validate it."""
    return PlatformConfig.model_validate(rendered_platform(serve))


def failing_render(*args: str, profile: str | None = "h800-mig") -> str:
    """Render with extra flags; the render must fail; returns helm's error output."""
    run = render.helm(*render.template_args(profile, *args), check=False)
    assert run.returncode != 0, f"helm accepted {args}"
    return run.stderr


# -- lint and render ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict_passes(helm_bin, profile):
    run = render.helm("lint", "--strict", str(render.CHART), "-f", str(render.profile_file(profile)), check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 chart(s) failed" in run.stdout


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_renders_the_expected_objects(rendered, profile):
    kinds = sorted({d["kind"] for d in rendered[profile]})
    expected = {"RayService", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "NetworkPolicy"}
    assert expected <= set(kinds), kinds
    assert all(d["metadata"].get("namespace") == render.NAMESPACE for d in rendered[profile]), (
        "namespace on every object"
    )
    groups = profile_values(profile)["workerGroups"]
    assert len([d for d in rendered[profile] if d["kind"] == "PodDisruptionBudget"]) == len(groups)


# -- offline validation ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_builtin_objects_validate_against_kubernetes(rendered, profile):
    checked = 0
    for doc in rendered[profile]:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, render.KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 8


def test_kubernetes_validate_refuses_a_broken_object(rendered):
    """The validator is strict: a typo in a Job is refused (so the passes above mean something)."""
    job = copy.deepcopy(one(rendered["h800-mig"], "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, render.KUBE_VERSION, strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_rayservice_and_its_raycluster_validate_against_the_kuberay_crds(rendered, profile):
    service = one(rendered[profile], "RayService")
    crd_validator("RayService").validate(service)
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": service["spec"]["rayClusterConfig"],
    }
    crd_validator("RayCluster").validate(cluster)


def test_the_crd_validator_refuses_unknown_fields_and_bad_types(rendered):
    service = copy.deepcopy(one(rendered["h800-mig"], "RayService"))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["idleTimeoutSecond"] = 60
    with pytest.raises(jsonschema.ValidationError, match="idleTimeoutSecond"):
        crd_validator("RayService").validate(service)
    del group["idleTimeoutSecond"]
    group["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("RayService").validate(service)


def test_service_monitor_selects_the_metrics_service(rendered):
    docs = rendered["h800-mig"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (metrics,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in metrics["spec"]["ports"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_has_requests_and_limits(rendered, profile):
    seen = 0
    for doc in rendered[profile]:
        for where, pod in pod_specs(doc):
            for container in pod.get("initContainers", []) + pod["containers"]:
                resources = container.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}/{container['name']}: {part}"
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                seen += 1
        if doc["kind"] == "RayService" and doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]:
            autoscaler = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
            assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])
    assert seen >= 4


@pytest.mark.parametrize("profile", PROFILES)
def test_no_secret_value_is_rendered(rendered, profile):
    """Secrets reach containers only as secretKeyRef; nothing rendered holds one."""
    for doc in rendered[profile]:
        assert doc["kind"] != "Secret"
        for _, pod in pod_specs(doc):
            for container in pod.get("initContainers", []) + pod["containers"]:
                for env in container.get("env", []):
                    if env["name"].startswith(("AWS_SECRET", "PG", "ZIMAGE_")) and env["name"] != "ZIMAGE_CONFIG":
                        assert "secretKeyRef" in env["valueFrom"], env


# -- one source of truth: the rendered config builds the platform ---------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_serve_config_builds_the_serve_app(rendered, profile):
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    from zimage_platform.serve.builder import app_builder, engine_deployment_name

    serve = serve_config(rendered[profile])
    schema = ServeDeploySchema.model_validate(serve)  # Ray's own schema for a Serve config
    (app,) = schema.applications
    assert app.import_path == "zimage_platform.serve.builder:app_builder"
    config = platform_from(serve)
    built = build_app(app_builder({"config": rendered_platform(serve)}), name=app.name)
    deployments = {d.name: d for d in built.deployments}
    expected = {engine_deployment_name(v, p) for p in config.pools for v in config.pool_variants(p)}
    assert expected and expected | {"Ingress", "Scheduler"} == set(deployments)
    for pool_name, pool in config.pools.items():
        for variant in config.pool_variants(pool_name):
            options = deployments[engine_deployment_name(variant, pool_name)].ray_actor_options
            assert options["resources"] == pool.ray_resources
            assert options["num_gpus"] == pool.num_gpus
    assert deployments["Ingress"].num_replicas == config.serve.ingress_replicas


@pytest.mark.parametrize("profile", PROFILES)
def test_configmap_platform_config_is_the_serve_config(rendered, profile):
    docs = rendered[profile]
    config_map = one(docs, "ConfigMap")
    (app,) = serve_config(docs)["applications"]
    assert yaml.safe_load(config_map["data"]["platform.yaml"]) == app["args"]["config"]
    assert yaml.safe_load(config_map["data"]["serve.yaml"]) == serve_config(docs)


def test_h800_profile_is_deploy_config_h800_mig():
    """The chart's H800 profile and deploy/config/h800-mig.yaml describe one layout."""
    deploy = yaml.safe_load((REPO / "deploy" / "config" / "h800-mig.yaml").read_text())
    platform = profile_values("h800-mig")["platform"]
    for key in ("pools", "variants", "buckets", "engine"):
        assert platform[key] == deploy[key], key

    def subset(small: Any, big: Any, where: str) -> None:
        if isinstance(small, dict):
            for k, v in small.items():
                subset(v, big[k], f"{where}.{k}")
        else:
            assert small == big, where

    subset(deploy, platform, "platform")


def test_dev_profile_is_deploy_config_cpu_pools():
    deploy = yaml.safe_load((REPO / "deploy" / "config" / "cpu-pools.yaml").read_text())
    platform = profile_values("dev")["platform"]
    assert platform["pools"] == deploy["pools"]
    assert platform["scheduler"] == deploy["scheduler"]


def test_whole_gpu_profile_serves_the_same_variants():
    deploy = yaml.safe_load((REPO / "deploy" / "config" / "h800-mig.yaml").read_text())
    platform = profile_values("whole-gpu")["platform"]
    assert platform["variants"] == deploy["variants"] and platform["buckets"] == deploy["buckets"]


# -- worker groups ↔ pools ------------------------------------------------------------------


def _advertised(group: dict[str, Any]) -> dict[str, int]:
    """The custom resources a worker group advertises, read back as Ray's autoscaler reads them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    return _get_custom_resources(group.get("resources", {}), group["rayStartParams"], group["groupName"])


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_groups_advertise_their_pools_ray_resources(rendered, profile):
    docs = rendered[profile]
    config = platform_from(serve_config(docs))
    groups = {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    values = profile_values(profile)["workerGroups"]
    for pool_name, pool in config.pools.items():
        bound = [name for name, g in values.items() if g.get("pool") == pool_name]
        if pool.ray_resources:
            assert bound, f"pool {pool_name} has no worker group"
        for name in bound:
            group = groups[name]
            advertised = _advertised(group)
            assert set(advertised) == set(pool.ray_resources)
            assert all(advertised[r] >= amount for r, amount in pool.ray_resources.items())
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            if pool.mig_profile:
                assert limits[f"nvidia.com/mig-{pool.mig_profile}"] == 1
                assert group["rayStartParams"]["num-gpus"] == "1"
            # Serve's minimum replicas of the pool's deployments must fit in the group.
            floor = sum(pool.autoscaling.min_replicas for _ in config.pool_variants(pool_name))
            assert floor <= group["maxReplicas"] * min(advertised.values())
    for name, group in groups.items():
        if not values[name].get("pool"):
            assert _advertised(group) == {}, "a generic group advertises no pool's resources"


def test_the_chart_cpu_fit_check_assumes_poolconfig_default():
    """_helpers.tpl falls back to 1.0 CPU per replica when a pool omits num_cpus."""
    assert PoolConfig.model_fields["num_cpus"].default == 1.0


# -- generated files are current ------------------------------------------------------------


def test_values_schema_is_generated_from_platform_config():
    committed = render.SCHEMA_FILE.read_text()
    assert committed == render.schema_text(), "helm/zimage-platform/values.schema.json is stale: run `make manifests`"
    schema = json.loads(committed)
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["properties"]["platform"] == {"$ref": "#/definitions/PlatformConfig"}


@pytest.mark.parametrize("profile", PROFILES)
def test_committed_manifests_equal_a_fresh_render(helm_bin, profile):
    path = render.MANIFESTS / f"{profile}.yaml"
    assert path.is_file(), f"{path} missing: run `make manifests`"
    assert path.read_text() == render.manifest_text(profile), f"{path} is stale: run `make manifests`"


# -- bad values fail at install -------------------------------------------------------------

SCHEMA_REFUSALS = [
    pytest.param(
        ["--set-json", 'platform.pools.realtime.classes=["vip"]'], "must be one of", id="unknown-priority-class"
    ),
    pytest.param(
        ["--set", "workerGroups.realtime.minReplicas=-1"], "workerGroups.realtime.minReplicas", id="negative-replicas"
    ),
    pytest.param(
        ["--set", "platform.pools.bulk.autoscaling.max_replicas=-3"], "max_replicas", id="negative-serve-replicas"
    ),
    pytest.param(["--set", "secrets.keyPepper=hunter2"], "secrets.keyPepper: Invalid type", id="inline-secret-string"),
    pytest.param(["--set", "secrets.databaseUrl.value=postgresql://u:p@db/z"], "value", id="inline-secret-value"),
    pytest.param(
        ["--set", "platform.tenancy.key_pepper=hunter2"], "platform.tenancy.key_pepper", id="pepper-in-config"
    ),
    pytest.param(
        ["--set", "platform.database.url=postgresql://zimage:hunter2@db:5432/zimage"],
        "platform.database.url",
        id="password-in-database-url",
    ),
    pytest.param(["--set", "platform.storage.embedded=true"], "platform.storage.embedded", id="embedded-s3"),
    pytest.param(["--set", "platform.paths.data_dir=var"], "platform.paths.data_dir", id="relative-path"),
    pytest.param(["--set", "platform.engine.backend=tensorflow"], "platform.engine.backend", id="unknown-backend"),
    pytest.param(["--set", "workerGroup.extra=1"], "workerGroup", id="unknown-top-level-key"),
    pytest.param(["--set", "workerGroups.realtime.migProfile=40gb"], "migProfile", id="malformed-mig-profile"),
    pytest.param(["--set", "workerGroups.realtime.resources.limits=null"], "limits", id="container-without-limits"),
]

TEMPLATE_REFUSALS = [
    pytest.param(
        ["--set", "workerGroups.realtime.migProfile=2g.20gb"],
        'does not match pool "realtime"\'s mig_profile',
        id="mig-profile-mismatch",
    ),
    pytest.param(["--set", "workerGroups.realtime.pool=vip"], 'no pool "vip"', id="group-for-unknown-pool"),
    pytest.param(
        ["--set", "workerGroups.bulk.pool=standard", "--set", "workerGroups.bulk.migProfile=2g.20gb"],
        'pool "bulk" needs Ray resources',
        id="pool-without-group",
    ),
    pytest.param(["--set", "platform.pools.bulk.num_gpus=0"], "would run on the CPU", id="mig-pool-on-cpu"),
    pytest.param(["--set", "workerGroups.realtime.resources.limits.cpu=1"], "below one replica", id="group-too-small"),
    pytest.param(["--set", "secrets.keyPepper.existingSecret="], "secrets.keyPepper", id="no-pepper"),
    pytest.param(
        ["--set", "platform.tenancy.rate_limit_backend=memory"],
        "needs platform.tenancy.rate_limit_backend: redis",
        id="memory-limits-with-many-ingresses",
    ),
    pytest.param(["--set", "secrets.databaseUrl.existingSecret=db"], "not both", id="database-url-twice"),
    pytest.param(["--set", "engines.s3Uri="], "engineBuild.enabled needs engines.s3Uri", id="build-without-target"),
]


@pytest.mark.parametrize(("args", "message"), SCHEMA_REFUSALS)
def test_values_schema_refuses(helm_bin, args, message):
    error = failing_render(*args)
    assert "values don't meet the specifications of the schema" in error
    assert message in error, error


@pytest.mark.parametrize(("args", "message"), TEMPLATE_REFUSALS)
def test_chart_refuses_inconsistent_values(helm_bin, args, message):
    error = failing_render(*args)
    assert message in error, error


def test_chart_without_a_profile_says_to_pick_one(helm_bin):
    assert "install with a profile" in failing_render(profile=None)


def test_service_monitor_renames_ray_metrics_like_the_ops_scrape_config(rendered):
    """Rules and dashboards in ops/ read zimage_*; Ray exports ray_zimage_*: both scrape paths rename alike."""
    ops = yaml.safe_load((REPO / "ops" / "prometheus" / "prometheus.yml").read_text())
    (platform_job,) = [j for j in ops["scrape_configs"] if j["job_name"] == "zimage-platform"]
    (ops_rule,) = platform_job["metric_relabel_configs"]
    (chart_rule,) = one(rendered["h800-mig"], "ServiceMonitor")["spec"]["endpoints"][0]["metricRelabelings"]
    assert chart_rule == {
        "sourceLabels": ops_rule["source_labels"],
        "regex": ops_rule["regex"],
        "targetLabel": ops_rule["target_label"],
        "replacement": ops_rule["replacement"],
    }


def test_billing_audit_pushes_to_the_pushgateway_when_given(helm_bin):
    run = render.helm(*render.template_args("h800-mig", "--set", "billingAudit.pushgateway=pushgateway:9091"))
    cron = [d for d in documents(run.stdout) if d["kind"] == "CronJob" and d["metadata"]["name"].endswith("-audit")]
    (container,) = cron[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[-2:] == ["--pushgateway", "pushgateway:9091"]
    assert command[:3] == ["zimage-platform", "billing", "audit"]


def test_a_tenant_policy_is_mounted_and_named_in_the_platform_config(helm_bin, tmp_path):
    """Without ``tenantPolicy`` the pods run the policy packaged with the platform (no policy_file,
    no mount); with it, every Ray pod (where the ingress may run) mounts it and the config names
    that path."""
    plain = render.helm(*render.template_args("h800-mig")).stdout
    assert "policy_file" not in plain and "/etc/zimage/policy" not in plain
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - id: brands\n    terms: [globex]\n")
    docs = documents(
        render.helm(*render.template_args("h800-mig", "--set-file", f"tenantPolicy.content={policy}")).stdout
    )
    path = "/etc/zimage/policy/policy.yaml"
    assert one(docs, "ConfigMap")["data"]["policy.yaml"].strip() == policy.read_text().strip()
    assert yaml.safe_load(one(docs, "ConfigMap")["data"]["platform.yaml"])["tenancy"]["policy_file"] == path
    assert rendered_platform(serve_config(docs))["tenancy"]["policy_file"] == path
    for where, spec in pod_specs(one(docs, "RayService")):
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == path]
        assert mounts and all(m["subPath"] == "policy.yaml" for m in mounts), where
