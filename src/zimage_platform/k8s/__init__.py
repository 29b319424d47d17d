"""Kubernetes operations with the official ``kubernetes`` client (``zimage-platform ops``).

- ``mig``: nodes' MIG slices and labels → pool sizes and Helm values that fit them;
- ``tenants``: tenant definitions (key hashes only) → a Secret/ConfigMap, idempotently;
- ``promo``: pre-scaling the RayService for a promotion window, and an exact restore.
"""
