"""``ops promo``: pre-scaling the RayService for a promotion window and restoring it exactly.

No Kubernetes API server can run here. The RayService is the chart's rendering for the H800
MIG profile (``deploy/manifests/h800-mig.yaml``) with the fields the API server adds
(resourceVersion, uid, status), recorded in ``fixtures/rayservice.json``; a fake API server on
127.0.0.1 applies the client's JSON patches (a stale resourceVersion fails the ``test`` op with
422, as the real server does) and records every request.
"""

from __future__ import annotations

import copy
import json

import yaml
from fakeapi import RAYSERVICE, FakeApiServer, fixture, ops

WINDOW = "2025-11-11T00:00:00+08:00/2025-11-12T02:00:00+08:00"
INSIDE = "2025-11-11T09:30:00+08:00"
AFTER = "2025-11-12T02:05:00+08:00"
BEFORE = "2025-11-10T23:55:00+08:00"


def promo(*args: str) -> dict:
    code, out, err = ops("promo", "--rayservice", "zimage-platform", "--namespace", "zimage", *args)
    assert code == 0, err
    return json.loads(out)


def run_at(now: str, *mins: str) -> dict:
    return promo(
        "--window", WINDOW, *(f"--min-replicas={m}" for m in mins or ("realtime=12", "standard=16")), "--now", now
    )


def groups(obj: dict) -> dict:
    return {g["groupName"]: g for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def engines(obj: dict) -> dict:
    app = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"][0]
    return {d["name"]: d for d in app.get("deployments", [])}


def test_inside_the_window_one_json_patch_raises_serve_and_worker_group_minimums(api: FakeApiServer):
    original = fixture("rayservice.json")
    api.put(RAYSERVICE, original)
    outcome = run_at(INSIDE)
    assert outcome["action"] == "applied"
    get, patch = api.requests
    assert (get.method, get.path) == ("GET", RAYSERVICE)
    assert (patch.method, patch.path, patch.content_type) == ("PATCH", RAYSERVICE, "application/json-patch+json")
    assert patch.body[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "48213377"}
    paths = [op["path"] for op in patch.body[1:]]
    assert paths[0] == "/spec/serveConfigV2" and paths[-1] == "/metadata/annotations/zimage.dev~1promo"
    # bulk is untouched; realtime's group is index 1, standard's 2 (the chart orders groups by name).
    groups_path = "/spec/rayClusterConfig/workerGroupSpecs"
    assert set(paths[1:-1]) == {f"{groups_path}/{i}/{f}" for i in (1, 2) for f in ("replicas", "minReplicas")} | {
        f"{groups_path}/2/maxReplicas"  # standard's 24 is below its new minimum of 32
    }
    promoted = api.objects[RAYSERVICE]
    deployments = engines(promoted)
    # Serve: an override per engine deployment, the pool's own queue-aware autoscaling with a floor
    # for the window (the platform config in `args` is untouched, so no replica restarts).
    realtime = deployments["Engine-turbo-realtime"]["autoscaling_config"]
    assert (realtime["min_replicas"], realtime["max_replicas"]) == (2, 16)  # the pool's own range
    assert realtime["policy"]["policy_function"] == "zimage_platform.scheduling.autoscaling:QueueAwarePolicy"
    start, end = WINDOW.split("/")
    assert realtime["policy"]["policy_kwargs"]["floors"] == [{"start": start, "end": end, "min_replicas": 12}]
    standard = deployments["Engine-base-standard"]["autoscaling_config"]
    assert standard["policy"]["policy_kwargs"]["floors"][0]["min_replicas"] == 16
    # Serve itself accepts the entry (its own schema), and the policy it would build holds the floor.
    from ray.serve.schema import DeploymentSchema

    DeploymentSchema.model_validate(deployments["Engine-turbo-realtime"])
    assert set(deployments) == {"Engine-turbo-realtime", "Engine-turbo-standard", "Engine-base-standard"}
    app = yaml.safe_load(promoted["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"] == yaml.safe_load(original["spec"]["serveConfigV2"])["applications"][0]["args"]
    # KubeRay: one slice per pod; standard runs two engine deployments of 16 each.
    g = groups(promoted)
    assert (g["realtime"]["minReplicas"], g["realtime"]["replicas"], g["realtime"]["maxReplicas"]) == (12, 12, 16)
    assert (g["standard"]["minReplicas"], g["standard"]["replicas"], g["standard"]["maxReplicas"]) == (32, 32, 32)
    assert groups(promoted)["bulk"] == groups(original)["bulk"]


def test_applying_again_writes_nothing_and_after_the_window_restores_exactly(api: FakeApiServer):
    original = fixture("rayservice.json")
    api.put(RAYSERVICE, original)
    run_at(INSIDE)
    api.requests.clear()
    assert run_at(INSIDE)["action"] == "unchanged"
    assert [r.method for r in api.requests] == ["GET"]

    api.requests.clear()
    outcome = run_at(AFTER)
    assert outcome["action"] == "restored"
    (patch,) = api.writes()
    assert patch.content_type == "application/json-patch+json" and patch.body[0]["op"] == "test"
    restored = api.objects[RAYSERVICE]
    expected = copy.deepcopy(original)
    expected["metadata"]["resourceVersion"] = restored["metadata"]["resourceVersion"]
    assert restored == expected  # byte-exact serveConfigV2, original group fields, annotation gone

    api.requests.clear()
    assert run_at(AFTER)["action"] == "outside window"
    assert not api.writes()


def test_before_the_window_nothing_happens(api: FakeApiServer):
    api.put(RAYSERVICE, fixture("rayservice.json"))
    assert run_at(BEFORE)["action"] == "outside window"
    assert not api.writes()


def test_restore_flag_and_a_changed_minimum_during_the_window(api: FakeApiServer):
    original = fixture("rayservice.json")
    api.put(RAYSERVICE, original)
    run_at(INSIDE, "realtime=12")
    outcome = run_at(INSIDE, "realtime=14")  # raised again mid-window: from the recorded originals
    assert outcome["action"] == "applied"
    assert groups(api.objects[RAYSERVICE])["realtime"]["minReplicas"] == 14
    record = json.loads(api.objects[RAYSERVICE]["metadata"]["annotations"]["zimage.dev/promo"])
    assert record["workerGroups"]["realtime"]["original"] == {"replicas": 2, "minReplicas": 2, "maxReplicas": 16}
    assert promo("--restore")["action"] == "restored"
    restored = api.objects[RAYSERVICE]
    assert restored["spec"] == original["spec"] and "zimage.dev/promo" not in restored["metadata"]["annotations"]


def test_a_concurrent_change_fails_the_patch_instead_of_overwriting_it(api: FakeApiServer, monkeypatch):
    """The resourceVersion read is tested in the patch: a writer in between makes the API refuse it."""
    from zimage_platform.k8s import promo as module

    api.put(RAYSERVICE, fixture("rayservice.json"))
    real = module.plan_apply

    def racing(obj, *args, **kwargs):
        outcome = real(obj, *args, **kwargs)
        api.objects[RAYSERVICE]["metadata"]["resourceVersion"] = "48213399"  # someone else wrote
        return outcome

    monkeypatch.setattr(module, "plan_apply", racing)
    code, _, err = ops(
        "promo",
        "--rayservice",
        "zimage-platform",
        "--namespace",
        "zimage",
        "--window",
        WINDOW,
        "--min-replicas",
        "realtime=12",
        "--now",
        INSIDE,
    )
    assert code == 1 and "error [kubernetes_api]: Kubernetes API: 422" in err
    assert "zimage.dev/promo" not in api.objects[RAYSERVICE]["metadata"]["annotations"]


def test_bad_arguments_are_refused_before_any_request(api: FakeApiServer):
    api.put(RAYSERVICE, fixture("rayservice.json"))
    code, _, err = ops(
        "promo", "--rayservice", "zimage-platform", "--window", "2025-11-11/2025-11-12", "--min-replicas", "realtime=2"
    )
    assert code == 2 and "UTC offset" in err and not api.requests
    code, _, err = ops(
        "promo", "--rayservice", "zimage-platform", "--window", WINDOW, "--min-replicas", "gpu=2", "--now", INSIDE
    )
    assert code == 2 and "no pool 'gpu'" in err and not api.writes()
