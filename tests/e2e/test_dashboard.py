"""The dashboard at ``/`` in a real headless Chromium (Debian's, driven by Playwright)
against a real deployment: orders turn ``completed`` and ``compensated`` on the page
as they progress, a timeline shows steps and compensations, the needs-attention
queue's Retry button resumes a stuck compensation, and dead letters replay.

Screenshots go to ``test-artifacts/``; ``docs/dashboard.png`` is a copy of
``dashboard-needs-attention.png``.  The browser is ``STREAMSAGA_CHROMIUM``, else
``/usr/bin/chromium``, else the one ``scripts/check`` unpacks into ``.cache/chromium/``
when the machine has none (no root needed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Locator, Page, ViewportSize, async_playwright, expect
from redis.asyncio import Redis

from contracts import naming
from contracts.envelope import Envelope, WorkflowRef, encode, new_message_id, utcnow
from tests.conftest import definitions_file
from tests.e2e.deployment import PARTITIONS, Deployment, order, short_order_saga

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_CANDIDATES = [Path("/usr/bin/chromium"), ROOT / ".cache" / "chromium" / "chromium"]
# Headless, and quiet: this machine's network reaches nothing but localhost.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = ViewportSize(width=1440, height=900)
UI_TIMEOUT_MS = 30_000  # generous: the workflows themselves finish in well under a second


class Dashboard:
    """The page under test, seen as a person sees it: rows, badges, counts and buttons."""

    def __init__(self, page: Page, api: str) -> None:
        self.page = page
        self.api = api
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    async def open(self) -> None:
        """Load the page and wait until it follows the live feed (from then on it does not poll)."""
        await self.page.goto(f"{self.api}/")
        await expect(self.page.locator("#connection")).to_have_attribute("data-mode", "live")

    def row(self, workflow_id: str) -> Locator:
        return self.page.locator(f'#recent tr[data-workflow-id="{workflow_id}"]')

    def count(self, status: str) -> Locator:
        return self.page.locator(f'[data-count="{status}"] .count-value')

    def step(self, name: str) -> Locator:
        return self.page.locator(f'#detail .step[data-step="{name}"]')

    async def sees_status(self, workflow_id: str, status: str) -> None:
        await expect(self.row(workflow_id).locator(".badge.status")).to_have_text(status, timeout=UI_TIMEOUT_MS)

    async def sees_count(self, status: str, value: int) -> None:
        await expect(self.count(status)).to_have_text(str(value), timeout=UI_TIMEOUT_MS)

    async def sees_notice(self, text: str) -> None:
        await expect(self.page.locator("#notice")).to_contain_text(text, timeout=UI_TIMEOUT_MS)

    async def open_timeline(self, workflow_id: str) -> None:
        await self.row(workflow_id).locator("a.wid").click()
        await expect(self.page.locator("#detail .full-id")).to_have_text(workflow_id, timeout=UI_TIMEOUT_MS)

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        await self.page.screenshot(path=path, full_page=True, animations="disabled")
        return path


@pytest.fixture
def chromium() -> Path:
    given = os.environ.get("STREAMSAGA_CHROMIUM")
    candidates = [Path(given)] if given else CHROMIUM_CANDIDATES
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        names = ", ".join(map(str, candidates))
        pytest.fail(f"no Chromium at {names}: scripts/check fetches Debian's chromium (or set STREAMSAGA_CHROMIUM)")
    return found


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def dashboard(
    browser: Browser, deployment: Deployment, request: pytest.FixtureRequest
) -> AsyncIterator[Dashboard]:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    seen = Dashboard(page, deployment.api)
    try:
        yield seen
        assert seen.errors == [], f"errors in the page: {seen.errors}"
    finally:
        await seen.screenshot(f"{request.node.name}-end")  # whatever the outcome: what the page showed last
        await context.close()


async def test_orders_turn_completed_and_compensated_on_the_page_as_they_progress(
    deployment: Deployment, session: aiohttp.ClientSession, dashboard: Dashboard
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    await dashboard.open()
    await dashboard.sees_count("total", 0)
    await expect(dashboard.page.locator("[data-count=total]")).to_have_attribute("aria-pressed", "true")  # all
    await expect(dashboard.page.locator("#recent tbody")).to_contain_text("No workflows yet")

    ids = {}
    for name, body in {"ok": order(customer="dash-ok"), "far": order(customer="dash-far", country="JP")}.items():
        status, reply = await deployment.submit(session, body)
        assert status == 202, reply
        ids[name] = reply["workflow_id"]

    # no reload: the page follows the workflows by itself
    await dashboard.sees_status(ids["ok"], "completed")
    await dashboard.sees_status(ids["far"], "compensated")
    await dashboard.sees_count("completed", 1)
    await dashboard.sees_count("compensated", 1)
    await dashboard.sees_count("total", 2)
    await dashboard.sees_count("running", 0)
    await expect(dashboard.row(ids["far"]).locator(".error-cell")).to_contain_text("shipping failed")

    # the timeline of the compensated order: shipping failed, the steps before it were undone in reverse
    await dashboard.open_timeline(ids["far"])
    await expect(dashboard.page.locator("#detail .detail-status .badge")).to_have_text("compensated")
    expected = {"payment": "compensated", "inventory": "compensated", "shipping": "failed", "notification": "skipped"}
    for step, step_status in expected.items():
        await expect(dashboard.step(step).locator(".badge")).to_have_text(step_status)
    for step in ("payment", "inventory"):
        await expect(dashboard.step(step).locator(".bar.run")).to_have_count(1)
        await expect(dashboard.step(step).locator(".bar.comp")).to_have_count(1)
        await expect(dashboard.step(step).locator(".step-facts")).to_contain_text("undone in")
    await expect(dashboard.step("shipping").locator(".step-facts")).to_contain_text("cannot ship to JP")
    history = dashboard.page.locator("#detail .history tbody tr")
    types = [text.strip() for text in await history.locator(".type").all_text_contents()]
    assert types[0] == "OrderSubmitted"
    assert types.index("ReleaseInventory") < types.index("RefundPayment")
    # a line's detail (what the payment worker says it refunded) on a row of its own, within the panel
    refunded = dashboard.page.locator("#detail .history .detail-row").filter(has_text="refunded")
    details = dashboard.page.locator("#detail .history")
    if await details.get_attribute("open") is None:
        await details.locator("summary").click()
    await expect(refunded).to_be_visible()
    box, panel = await refunded.bounding_box(), await dashboard.page.locator("#detail").bounding_box()
    assert box is not None
    assert panel is not None
    assert box["x"] + box["width"] <= panel["x"] + panel["width"] + 1

    # every worker is listed live; a count filters the list
    for worker in ("payment", "inventory", "shipping", "notification"):
        await expect(dashboard.page.locator(f'#participants tr[data-participant="{worker}"]')).to_contain_text("live")
    await dashboard.count("completed").click()
    await expect(dashboard.page.locator("[data-count=total]")).to_have_attribute("aria-pressed", "false")
    await expect(dashboard.row(ids["far"])).to_have_count(0)
    await expect(dashboard.row(ids["ok"])).to_have_count(1)
    await dashboard.screenshot("outcomes")


async def test_without_the_live_feed_the_page_polls_and_still_follows_the_workflows(
    deployment: Deployment, session: aiohttp.ClientSession, dashboard: Dashboard
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    await dashboard.page.route("**/v1/events*", lambda route: route.fulfill(status=404))  # an older controller
    await dashboard.page.goto(f"{deployment.api}/")
    await expect(dashboard.page.locator("#connection")).to_have_attribute("data-mode", "polling")
    await expect(dashboard.page.locator("#connection")).to_contain_text("Polling every 2 s")

    status, reply = await deployment.submit(session, order(customer="poll", country="JP"))
    assert status == 202, reply
    await dashboard.sees_status(reply["workflow_id"], "compensated")
    await dashboard.sees_count("compensated", 1)

    # the controller goes away: the page greys out what it can no longer vouch for, until it is back
    await dashboard.page.route("**/v1/**", lambda route: route.abort())
    await expect(dashboard.page.locator("#connection")).to_have_attribute("data-mode", "offline")
    await expect(dashboard.page.locator("main")).to_have_css("opacity", "0.55")
    await dashboard.page.unroute("**/v1/**")
    await dashboard.page.route("**/v1/events*", lambda route: route.fulfill(status=404))
    await expect(dashboard.page.locator("#connection")).to_have_attribute("data-mode", "polling")
    await expect(dashboard.page.locator("main")).to_have_css("opacity", "1")


async def test_a_workflow_that_needs_attention_is_resumed_by_the_retry_button(
    deployment: Deployment, session: aiohttp.ClientSession, dashboard: Dashboard, tmp_path: Path
) -> None:
    deployment.controller_args = ["--definitions", str(definitions_file(tmp_path / "defs.json", short_order_saga()))]
    deployment.start_controller()
    for worker in ("inventory", "shipping", "notification"):
        deployment.start_worker(worker)
    payment = deployment.start_worker("payment", 1, "--refund-fail-customers", "stuck")
    await deployment.wait_ready(session)
    await dashboard.open()

    others = [
        order(customer="c-7", items=[("BOOK-1", 2, "12.50")]),
        order(customer="c-8", items=[("LAMP-2", 1, "1200.00")]),  # over the payment limit: failed
        order(customer="c-9", items=[("MUG-1", 1, "8.00"), ("RARE-1", 101, "3.00")]),  # out of stock: compensated
    ]
    for body in others:
        status, reply = await deployment.submit(session, body)
        assert status == 202, reply
    stuck_order = order(customer="stuck", items=[("SKU-A", 1, "9.00")], country="JP")  # its refund fails
    status, reply = await deployment.submit(session, stuck_order)
    assert status == 202, reply
    stuck = reply["workflow_id"]

    queued = dashboard.page.locator(f'#attention tr[data-workflow-id="{stuck}"]')
    await expect(queued).to_contain_text("compensating payment failed after 3 attempts", timeout=UI_TIMEOUT_MS)
    await dashboard.sees_status(stuck, "needs attention")
    await dashboard.sees_count("needs_attention", 1)
    await dashboard.sees_count("total", 4)
    await dashboard.open_timeline(stuck)
    await expect(dashboard.step("payment").locator(".badge")).to_have_text("compensating")
    await expect(dashboard.step("payment").locator(".step-facts")).to_contain_text("attempt 3")
    await expect(dashboard.page.locator("#detail .retry")).to_be_visible()
    await dashboard.screenshot("needs-attention")

    # the operator fixes the payment worker, then presses Retry in the queue
    deployment.stop_process(payment)
    deployment.start_worker("payment", 2)
    await queued.get_by_role("button", name="Retry").click()
    await dashboard.sees_notice(f"Retry requested for workflow {stuck[:10]}")
    await dashboard.sees_status(stuck, "compensated")
    await expect(queued).to_have_count(0)
    await expect(dashboard.page.locator("#attention tbody")).to_contain_text("Nothing needs attention")
    await dashboard.sees_count("needs_attention", 0)
    await expect(dashboard.step("payment").locator(".badge")).to_have_text("compensated")
    await expect(dashboard.page.locator("#detail .history")).to_contain_text("retry requested by dashboard")
    assert (await deployment.workflow(session, stuck))["status"] == "compensated"


async def test_dead_letters_are_listed_and_replayed_from_the_page(
    deployment: Deployment, session: aiohttp.ClientSession, dashboard: Dashboard, redis: Redis
) -> None:
    deployment.start_all()
    await deployment.wait_ready(session)
    await dashboard.open()
    await expect(dashboard.page.locator("#dead-letters tbody")).to_contain_text("No dead letters")

    # on a stream only the controller reads: an event of a workflow nobody started, and an
    # entry too broken to stand on a stream again
    ghost = Envelope(
        message_id=new_message_id(),
        type="CustomerNotified",
        correlation_id="ghost-1",
        workflow=WorkflowRef(name="order"),
        producer="tests",
        occurred_at=utcnow(),
        payload={"customer_id": "c-1"},
    )
    ghost_stream = naming.message_stream(naming.partition_of("ghost-1", PARTITIONS), ghost.type)
    await redis.xadd(ghost_stream, dict[Any, Any](encode(ghost)))
    await redis.xadd(naming.message_stream(0, ghost.type), {"type": ghost.type, "envelope": "{}"})

    letters = dashboard.page.locator("#dead-letters tbody tr[data-dead-letter-id]")
    await expect(letters).to_have_count(2, timeout=UI_TIMEOUT_MS)
    await expect(dashboard.page.locator("#dead-letters-count")).to_have_text("2")
    ghost_row = letters.filter(has_text="no such workflow 'ghost-1'")
    broken_row = letters.filter(has_not_text="ghost-1")
    await expect(ghost_row).to_have_count(1)
    ghost_id = await ghost_row.get_attribute("data-dead-letter-id")
    assert ghost_id is not None

    await broken_row.get_by_role("button", name="Replay").click()
    await dashboard.sees_notice("cannot be replayed")
    await expect(dashboard.page.locator("#notice")).to_be_in_viewport()  # where the button was, scrolled down
    await expect(broken_row).to_have_count(1)
    # an entry that can never be replayed is purged from the page, once confirmed
    dashboard.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await broken_row.get_by_role("button", name="Purge").click()
    await dashboard.sees_notice("Purged dead letter")
    await expect(letters).to_have_count(1)
    await expect(dashboard.page.locator("#dead-letters-count")).to_have_text("1")

    await ghost_row.get_by_role("button", name="Replay").click()
    await dashboard.sees_notice(f"Replayed dead letter {ghost_id}")
    # replayed to its stream, the event reaches the controller again, which still knows no such workflow
    await expect(dashboard.page.locator(f'#dead-letters tr[data-dead-letter-id="{ghost_id}"]')).to_have_count(0)
    await expect(ghost_row).to_have_count(1, timeout=UI_TIMEOUT_MS)
    assert await ghost_row.get_attribute("data-dead-letter-id") != ghost_id


async def test_a_running_steps_deadline_is_on_the_axis_and_a_phone_needs_no_sideways_scrolling(
    deployment: Deployment, session: aiohttp.ClientSession, dashboard: Dashboard
) -> None:
    deployment.start_controller()
    deployment.start_worker("payment")  # and no inventory worker: its step runs on until its deadline
    await deployment.wait_ready(session)
    await dashboard.open()
    status, reply = await deployment.submit(session, order(customer="waits"))
    assert status == 202, reply
    await dashboard.open_timeline(reply["workflow_id"])
    inventory = dashboard.step("inventory")
    await expect(inventory.locator(".badge")).to_have_text("running")
    await expect(inventory.locator(".step-facts")).to_contain_text("deadline")
    await expect(inventory.locator(".marker.deadline")).to_have_count(1)  # the axis reaches it
    # and what waits for the worker nobody runs
    await expect(dashboard.page.locator("#uncovered")).to_contain_text("handles PaymentCaptured")
    await expect(dashboard.page.locator("#uncovered li").filter(has_text="PaymentCaptured")).to_contain_text(
        "1 waiting", timeout=UI_TIMEOUT_MS
    )

    more = dashboard.page.locator("#recent-more")
    await expect(more).to_be_hidden()
    for _ in range(50):  # one more than the list shows
        status, reply = await deployment.submit(session, order(customer="many"))
        assert status == 202, reply
    await expect(more).to_have_text("The 50 most recently updated of 51; a workflow's own page is #/workflows/<id>.")

    await dashboard.page.set_viewport_size(ViewportSize(width=390, height=844))
    overflow = await dashboard.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    await dashboard.screenshot("phone")


async def test_the_page_and_its_files_are_served_under_a_strict_policy_and_nothing_else_is(
    deployment: Deployment, session: aiohttp.ClientSession
) -> None:
    deployment.start_controller()
    await deployment.wait_ready(session)
    async with session.get(f"{deployment.api}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "connect-src 'self'" in policy
        page = await response.text()
    for asset, content_type in (("app.js", "javascript"), ("style.css", "text/css")):
        assert f"/static/{asset}" in page
        async with session.get(f"{deployment.api}/static/{asset}") as response:
            assert response.status == 200, asset
            assert content_type in response.content_type
            assert response.headers["Cache-Control"] == "no-cache"
    for path in ("/static/missing.js", "/static/%2e%2e%2fapi.py", "/static/.hidden.js", "/static/"):
        async with session.get(f"{deployment.api}{path}") as response:
            assert response.status == 404, path
    async with session.get(f"{deployment.api}/v1/stats") as response:
        assert response.status == 200
        assert await response.json() == {
            "counts": {
                status: 0
                for status in ("running", "completed", "compensating", "compensated", "failed", "needs_attention")
            },
            "total": 0,
        }
