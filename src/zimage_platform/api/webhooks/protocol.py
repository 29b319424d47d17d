"""Wire schemas of ``/v1/webhooks``: the tenant's deliveries (dead letters among them) and secret."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class Delivery(BaseModel):
    """One webhook event and where its delivery stands."""

    id: str = Field(description="The event id, sent as `webhook-id` on every attempt.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    job_id: str
    event_type: str
    url: str
    status: Literal["pending", "delivered", "dead_letter"] = Field(
        description="`pending`: being delivered or retried; `dead_letter`: given up on (redeliver it)."
    )
    attempts: int = Field(description="Attempts since it was queued or last redelivered.")
    last_status_code: int | None = Field(description="The receiver's last HTTP status, if it answered.")
    last_error: str | None = Field(
        description="Reason code of the last failed attempt: `http_status`, `timeout`, `connect_failed`, "
        "`tls_failed`, `protocol_error`, `network_error`, `unresolvable`, `not_public`, `secret_unavailable`."
    )
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When the next attempt is due (pending only).")
    delivered_at: datetime | None
    give_up_at: datetime | None = Field(description="A pending event still failing then becomes a dead letter.")


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]


class SigningSecret(BaseModel):
    secret: str = Field(description="`whsec_...`: give it to a Standard Webhooks verifier.")
    generation: int
    expires_at: datetime | None = Field(description="Set on the previous secret while a rotation overlaps.")


class WebhookSecret(BaseModel):
    """Events are signed with every listed secret (one signature each in `webhook-signature`)."""

    object: Literal["webhook_secret"] = "webhook_secret"
    data: list[SigningSecret]
