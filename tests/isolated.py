"""A test module's own platform config: its data folder, bucket, database and tenants."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zimage_platform.config import PlatformConfig


def isolated_config(config: PlatformConfig, s3: Any, root: Path, **sections: dict[str, Any]) -> PlatformConfig:
    """The session config with its own data dir, results bucket, SQLite database and tenants
    folder under ``root``, S3 credentials exported the way operators set them; ``sections``
    changes more config sections (``limits={"sync_timeout_s": 60}``)."""
    os.environ["AWS_ACCESS_KEY_ID"] = s3.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3.secret_key
    changes: dict[str, dict[str, Any]] = {
        "paths": {"data_dir": root / "var"},
        "storage": {"endpoint_url": s3.endpoint_url, "bucket": "results"},
        "database": {"url": f"sqlite:///{root / 'jobs.db'}"},
        "tenancy": {"dirs": [root / "tenants"], "reload_s": 0.01},
        **sections,
    }
    return config.model_copy(update={name: getattr(config, name).model_copy(update=c) for name, c in changes.items()})
