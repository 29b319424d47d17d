"""``ops mig-plan``: node inventory → pool sizes and Helm values.

No Kubernetes API server can run here, so the nodes are recorded, real-shaped Node objects
(GPU operator resources and GPU-feature-discovery labels) served by a fake API server on
127.0.0.1 that also records what the official client asks for.
"""

from __future__ import annotations

import yaml
from fakeapi import REPO, FakeApiServer, fixture, ops

from zimage_platform.config import load_config
from zimage_platform.k8s.mig import node_gpus, plan_pools, values_snippet

H800 = REPO / "deploy/config/h800-mig.yaml"


def test_inventory_counts_only_schedulable_settled_nodes():
    nodes = [node_gpus(n) for n in fixture("nodes.json")["items"]]
    by = {n.name: n for n in nodes}
    assert by["gpu-h800-a"].slices == {"3g.40gb": 8, "2g.20gb": 8, "1g.20gb": 8} and by["gpu-h800-a"].excluded is None
    assert by["gpu-h800-b"].excluded == "cordoned"
    assert by["gpu-h800-c"].excluded == "MIG reconfiguration pending"
    assert by["gpu-h800-d"].slices == {"1g.10gb": 56}  # single strategy: the profile is in the product label
    assert by["gpu-h800-e"].slices == {"gpu": 8}  # MIG disabled: whole GPUs
    assert by["cpu-1"].slices == {}
    plan = plan_pools(load_config(H800), nodes)
    assert plan.available == {"1g.10gb": 56, "1g.20gb": 8, "2g.20gb": 8, "3g.40gb": 8, "gpu": 8}
    assert any("gpu-h800-b" in w for w in plan.warnings) and any("gpu-h800-c" in w for w in plan.warnings)


def test_plan_cuts_pools_to_the_slices_that_exist():
    plan = plan_pools(load_config(H800), [node_gpus(n) for n in fixture("nodes.json")["items"]])
    pools = {p.pool: p for p in plan.pools}
    # standard serves two variants (turbo, base): each deployment may scale to the 8 slices,
    # together they start with 2 + 2 of them.
    assert (pools["standard"].min_replicas, pools["standard"].max_replicas) == (2, 8)
    assert (pools["standard"].group_min, pools["standard"].group_max) == (4, 8)
    assert (pools["realtime"].min_replicas, pools["realtime"].max_replicas) == (2, 8)
    assert (pools["bulk"].min_replicas, pools["bulk"].max_replicas) == (0, 8)
    values = values_snippet(plan)
    assert values["workerGroups"]["realtime"] == {
        "pool": "realtime",
        "migProfile": "3g.40gb",
        "replicas": 2,
        "minReplicas": 2,
        "maxReplicas": 8,
    }
    assert values["platform"]["pools"]["bulk"] == {"autoscaling": {"min_replicas": 0, "max_replicas": 8}}


def test_mig_plan_command_lists_nodes_and_prints_values(api: FakeApiServer):
    api.lists["/api/v1/nodes"] = fixture("nodes.json")
    code, out, err = ops("mig-plan", "--selector", "nvidia.com/gpu.present=true", config=H800)
    assert code == 0, err
    (request,) = api.requests
    assert (request.method, request.path) == ("GET", "/api/v1/nodes")
    assert request.query == {"labelSelector": ["nvidia.com/gpu.present=true"]}
    assert request.authorization == "Bearer test-token-not-a-secret"
    assert not api.writes()
    values = yaml.safe_load(out)
    assert values["workerGroups"]["standard"]["maxReplicas"] == 8
    assert "# pool standard: 2g.20gb ×8" in out and "not counted: cordoned" in out
