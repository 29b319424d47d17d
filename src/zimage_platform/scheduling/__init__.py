"""Job lifecycle: durable job rows, priority queues, dispatch, retries and webhooks."""
