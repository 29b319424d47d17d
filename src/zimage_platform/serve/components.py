"""The platform's parts, built from the one config: shared by the Serve deployments, the CLI,
tests and benchmarks, so every way of running the platform assembles it the same way."""

from __future__ import annotations

from zimage_platform.api.services import PlatformServices, SchedulerClient, SubmitGates
from zimage_platform.config import PlatformConfig
from zimage_platform.db import create_db_engine, upgrade
from zimage_platform.netsafe import IMAGE_URLS
from zimage_platform.scheduling.deliveries import DeliveryOutbox, WebhookDispatcher
from zimage_platform.scheduling.notifications import BatchTracker, WebhookNotifier
from zimage_platform.scheduling.service import EngineClient, SchedulerService
from zimage_platform.scheduling.store import JobStore
from zimage_platform.scheduling.webhooks import RetryPolicy, WebhookSender
from zimage_platform.storage.results import ResultStore
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import configure_tracing, instrument_engine
from zimage_platform.tenancy import TenantRegistry, load_pepper
from zimage_platform.tenancy.audit import AuditLog
from zimage_platform.tenancy.policy import PolicyRegistry, load_policy_spec
from zimage_platform.tenancy.ratelimit import TenantRateLimiter
from zimage_platform.tenancy.webhook_secrets import WebhookSecrets


def job_store(config: PlatformConfig, *, migrate: bool = False) -> JobStore:
    engine = create_db_engine(config.database_url)
    if migrate:
        upgrade(engine)
    instrument_engine(engine)
    count_db_errors(engine)
    return JobStore(engine, billing=config.billing)


def count_db_errors(engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "handle_error")
    def _failed(context) -> None:
        statement = (context.statement or "").lstrip().split(" ", 1)[0].upper()
        metrics().db_errors.inc(
            operation=statement if statement in ("SELECT", "INSERT", "UPDATE", "DELETE") else "other"
        )


def result_store(config: PlatformConfig) -> ResultStore:
    s = config.storage
    return ResultStore(s.bucket, endpoint_url=s.endpoint_url, region=s.region, presign_ttl_s=s.presign_ttl_s)


def tenant_registry(config: PlatformConfig) -> TenantRegistry:
    pepper = load_pepper(config.tenancy.key_pepper, config.key_pepper_file)
    return TenantRegistry(config.tenant_dirs, pepper, reload_s=config.tenancy.reload_s)


def scheduler_service(
    config: PlatformConfig, engines: EngineClient, *, store: JobStore | None = None
) -> SchedulerService:
    """The scheduler with its listeners: webhooks (through the outbox) and bulk-batch completion."""
    configure_tracing(config.telemetry, "scheduler")
    store = store or job_store(config, migrate=True)
    results = result_store(config)
    w = config.webhooks
    scheduler = SchedulerService(config, store, engines)
    outbox = DeliveryOutbox(store, max_age_s=w.max_age_s)
    dispatcher = WebhookDispatcher(
        outbox,
        WebhookSender(allow_private=w.allow_private, timeout_s=w.timeout_s),
        WebhookSecrets.from_config(config, store.engine, tenant_registry(config).get).signing,
        policy=RetryPolicy(backoff_s=w.backoff_s, max_backoff_s=w.max_backoff_s, max_age_s=w.max_age_s),
        per_tenant=w.per_tenant_concurrency,
        poll_s=w.poll_s,
    )
    scheduler.add_listener(WebhookNotifier(outbox, dispatcher))
    scheduler.add_listener(BatchTracker(store, results))
    return scheduler


def rate_limiter(config: PlatformConfig) -> TenantRateLimiter:
    t = config.tenancy
    return TenantRateLimiter(
        t.rate_limit_backend,
        redis_url=t.redis_url,
        key_prefix=t.redis_prefix,
        timeout_s=t.redis_timeout_s,
        retry_s=t.redis_retry_s,
        replicas=config.serve.ingress_replicas,
    )


def policy_registry(config: PlatformConfig) -> PolicyRegistry:
    return PolicyRegistry(load_policy_spec(config.tenancy.policy_file))


def platform_services(
    config: PlatformConfig, scheduler: SchedulerClient, *, store: JobStore | None = None
) -> PlatformServices:
    store = store or job_store(config)
    return PlatformServices(
        config=config,
        store=store,
        results=result_store(config),
        scheduler=scheduler,
        tenants=tenant_registry(config),
        http=IMAGE_URLS.client(allow_private=config.limits.allow_private_urls, timeout=15.0),
        rate_limiter=rate_limiter(config),
        policies=policy_registry(config),
        audit=AuditLog(store.engine),
        submit_gates=SubmitGates(config.serve.submit_concurrency),
    )
