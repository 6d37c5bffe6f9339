"""The orders a benchmark submits, and how it submits them over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bench.keepalive import HttpError, KeepAliveClient
from bench.load import SubmitError


def order(run: str, index: int) -> dict[str, Any]:
    """A valid order that every example worker accepts (given a high payment limit and stock).

    Each order has its own id and customer, as real traffic would: the workers'
    effects are idempotent by order, so repeating one id would measure dedupe.
    """
    return {
        "order_id": f"{run}-{index}",
        "customer_id": f"customer-{index % 10_000}",
        "items": [
            {"sku": f"SKU-{index % 50}", "quantity": 1, "unit_price": "19.99"},
            {"sku": f"SKU-{(index + 17) % 50}", "quantity": 2, "unit_price": "5.25"},
        ],
        "currency": "USD",
        "ship_to": {"country": "US", "name": "Bench Customer", "city": "Springfield", "postal_code": "12345"},
    }


class HttpSubmitter:
    """``POST /v1/orders`` on keep-alive connections; returns the workflow id of the 202."""

    def __init__(self, client: KeepAliveClient, run: str, timeout: float) -> None:
        self.client = client
        self.run = run
        self.timeout = timeout

    async def __call__(self, index: int) -> str:
        body = orjson.dumps(order(self.run, index))
        try:
            async with asyncio.timeout(self.timeout):
                status, raw = await self.client.post("/v1/orders", body)
        except TimeoutError as exc:
            raise SubmitError("http_timeout", f"no answer within {self.timeout}s") from exc
        except HttpError as exc:
            raise SubmitError("http_error", str(exc)) from exc
        if status != 202:
            raise SubmitError(f"http_{status}", raw[:200].decode(errors="replace"))
        workflow_id = orjson.loads(raw).get("workflow_id")
        if not isinstance(workflow_id, str):
            raise SubmitError("http_no_workflow_id", raw[:200].decode(errors="replace"))
        return workflow_id
