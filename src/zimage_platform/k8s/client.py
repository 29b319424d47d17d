"""Connecting to the Kubernetes API: in-cluster (a CronJob's service account) or a kubeconfig."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _kubeconfig(explicit: str | None) -> str | None:
    """The client reads ``$KUBECONFIG`` once, at import: read it at call time instead."""
    return explicit or os.environ.get("KUBECONFIG") or None


def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """In a pod (and no kubeconfig named): the service account; else ``kubeconfig`` / ``$KUBECONFIG``."""
    from kubernetes import client, config

    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    configuration = client.Configuration()
    config.load_kube_config(config_file=_kubeconfig(kubeconfig), context=context, client_configuration=configuration)
    return client.ApiClient(configuration)


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else ``default``."""
    if kubeconfig is None and context is None and SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig(kubeconfig))
        if context:
            active = next(c for c in contexts if c["name"] == context)
    except (config.ConfigException, StopIteration, OSError):
        return "default"
    return (active or {}).get("context", {}).get("namespace") or "default"
