"""``GET /v1/models``: the variants, their buckets, backends, defaults and pools (OpenAI list shape)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from zimage_platform.api.deps import Services, Tenant
from zimage_platform.api.images.serving import MODEL_ALIASES
from zimage_platform.engines.engine import BACKENDS
from zimage_platform.pipeline.samplers import SAMPLERS
from zimage_platform.pipeline.schedules import SCHEDULES

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(services: Services, tenant: Tenant) -> dict[str, Any]:
    config = services.config
    status = await services.scheduler.status()
    aliases = {v: a for a, v in MODEL_ALIASES.items()}
    data = []
    for name, spec in sorted(config.variants.items()):
        if tenant.limits.allowed_variants and name not in tenant.limits.allowed_variants:
            continue
        data.append(
            {
                "id": aliases.get(name, name),
                "object": "model",
                "created": 0,
                "owned_by": "zimage-platform",
                "variant": name,
                "description": spec.description,
                "mode": spec.mode,
                "buckets": [str(b) for b in config.buckets_for(name)],
                "backend": config.engine.backend,
                "backends": sorted(BACKENDS),
                "precision": spec.precision,
                "defaults": spec.defaults.model_dump(),
                "limits": spec.limits.model_dump(),
                "samplers": list(SAMPLERS),
                "schedulers": list(SCHEDULES),
                "sizes": config.buckets_for(name).rule.describe(),
                "pools": [p for p in config.pools if name in config.pool_variants(p)],
            }
        )
    pools = {
        pool_name: {
            "mig_profile": pool.mig_profile,
            "classes": pool.classes,
            "queue": status["pools"].get(pool_name, {}).get("queue", {}),
            "engines": status["pools"].get(pool_name, {}).get("engines", {}),
        }
        for pool_name, pool in config.pools.items()
    }
    return {"object": "list", "data": data, "pools": pools}
