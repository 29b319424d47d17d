"""The example platform configs in deploy/config load with the same schema as everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zimage_platform.config import PlatformConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_cpu_pools_config_maps_each_class_to_a_pool():
    config = load_config(REPO / "deploy" / "config" / "cpu-pools.yaml")
    assert {config.pool_for_class(c) for c in ("realtime", "standard", "bulk")} == {"realtime", "standard", "bulk"}
    assert config.pool_variants("realtime") == ["turbo"]


def test_h800_config_runs_fp8_on_small_slices_and_refuses_bf16_there():
    data = yaml.safe_load((REPO / "deploy" / "config" / "h800-mig.yaml").read_text())
    config = PlatformConfig.model_validate(data)
    assert config.pools["bulk"].slice_gb == 20 and config.precision_in("bulk", "turbo") == "fp8"
    assert config.precision_in("realtime", "turbo") == "bf16"
    data["pools"]["bulk"]["precision"] = "bf16"
    with pytest.raises(ValueError, match="cannot hold turbo at bf16"):
        PlatformConfig.model_validate(data)
