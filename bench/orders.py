"""The orders a benchmark submits, and how it submits them over HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

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
    """``POST /v1/orders`` on one keep-alive session; returns the workflow id of the 202."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, run: str) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/v1/orders"
        self.run = run
        self._headers = {"Content-Type": "application/json"}

    async def __call__(self, index: int) -> str:
        body = orjson.dumps(order(self.run, index))
        try:
            async with self.session.post(self.url, data=body, headers=self._headers) as response:
                raw = await response.read()
                if response.status != 202:
                    raise SubmitError(f"http_{response.status}", raw[:200].decode(errors="replace"))
        except aiohttp.ClientError as exc:
            raise SubmitError(f"http_{type(exc).__name__}", str(exc)) from exc
        workflow_id = orjson.loads(raw).get("workflow_id")
        if not isinstance(workflow_id, str):
            raise SubmitError("http_no_workflow_id", raw[:200].decode(errors="replace"))
        return workflow_id
