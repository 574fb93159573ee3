"""The console, used as a person would: a real headless Chromium on the pages of a running flow.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them),
driven by selenium; the console runs as its own process (``runner.py
console``) against the test's server, with every function running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from functions.events import OrderCreated
from orderflow.ops.server import free_port, wait_for_port
from orderflow.runtime.gateway import DOWN_TOKEN, SimulatedGateway
from orderflow.runtime.kv import KvStore
from tests.conftest import ROOT, StartFlow
from tests.e2e.test_gateway_outage import SHORTER
from tests.flowkit import Flow, order, terminal_counts
from tests.waiting import value_when

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine's network is closed: no background connections, no updates.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Callable[[Flow], Any]]:
    """Factory: ``runner.py console`` on a free loopback port against the flow's server."""
    started: list[subprocess.Popen[bytes]] = []

    async def start(flow: Flow, *options: str) -> str:
        port = free_port()
        env = {**os.environ, "NATS_URL": flow.server.url}
        command = [sys.executable, str(ROOT / "runner.py"), "--config", str(flow.config),
                   "--mode", flow.topology.mode, "console", "--port", str(port),
                   *options]  # fmt: skip
        log = (tmp_path / "console.log").open("wb")
        process = await asyncio.to_thread(
            subprocess.Popen, command, env=env, cwd=ROOT, stdout=log, stderr=log
        )
        started.append(process)
        await asyncio.to_thread(wait_for_port, port, 20.0)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()`` (run off the loop: selenium blocks) until it is truthy, or fail saying what."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.2)


def cell(driver: WebDriver, function: str, field: str) -> str:
    row = driver.find_element(By.CSS_SELECTOR, f'#functions tr[data-function="{function}"]')
    return str(row.find_element(By.CSS_SELECTOR, f'td[data-field="{field}"]').text)


async def test_the_flow_page_counts_change_while_orders_flow(
    start_flow: StartFlow, console: Callable[[Flow], Any], browser: WebDriver
) -> None:
    flow = await start_flow()
    url = await console(flow)
    await asyncio.to_thread(browser.get, url + "/")
    assert await until(lambda: cell(browser, "payment", "instances") == "1", 10, "payment up")
    before = int(cell(browser, "payment", "processed"))
    browser.execute_script("window.notReloaded = true;")  # gone if the page reloads

    orders = [order(f"cf-{i}") for i in range(5)]
    await flow.publish(*orders)
    await until(lambda: int(cell(browser, "payment", "processed")) >= before + 5, 15,
                "payment's processed count rising on the open page")  # fmt: skip
    await until(lambda: int(cell(browser, "order", "processed")) >= 5, 15, "order's count")
    edge = '#edges tr[data-edge="orders.created -> payment"] td[data-field="events"]'
    await until(lambda: int(browser.find_element(By.CSS_SELECTOR, edge).text) >= 5, 10,
                "the edge's events over the last minute")  # fmt: skip
    assert browser.execute_script("return window.notReloaded === true;")
    # The topology, drawn from streams.yaml: an arrow per consumed and per emitted kind.
    lines = browser.find_elements(By.CSS_SELECTOR, "#topology-drawing line")
    drawn = {line.get_attribute("data-edge") for line in lines}
    wanted = {f"{k} -> {n}" for n, fn in flow.topology.functions.items()
              for c in fn.consumers for k in c.events}  # fmt: skip
    wanted |= {f"{n} -> {k}" for n, fn in flow.topology.functions.items() for k in fn.emits}
    assert drawn == wanted
    if shot := os.environ.get("CONSOLE_SCREENSHOT"):  # to look at the page: a PNG there
        browser.save_screenshot(shot)


async def test_searching_an_order_opens_its_whole_timeline(
    start_flow: StartFlow, console: Callable[[Flow], Any], browser: WebDriver
) -> None:
    flow = await start_flow()
    url = await console(flow)
    await flow.publish(order("cs-1"))
    await flow.wait_finished(["cs-1"])
    await asyncio.to_thread(browser.get, url + "/")
    box = browser.find_element(By.CSS_SELECTOR, "#find input[name=order_id]")
    box.send_keys("cs-1")
    box.submit()
    await until(lambda: browser.current_url.endswith("/orders/cs-1"), 10, "the order's URL")
    kinds = [row.get_attribute("data-kind")
             for row in browser.find_elements(By.CSS_SELECTOR, "#timeline tr.step")]  # fmt: skip
    assert kinds[0] == "orders.created" and kinds[-1] == "orders.completed", kinds
    assert set(kinds) == {"orders.created", "payments.succeeded", "stock.reserved",
                          "delivery.scheduled", "orders.completed"}  # fmt: skip
    outcome = browser.find_element(By.ID, "outcome")
    assert outcome.get_attribute("data-outcome") == "completed"
    assert browser.find_elements(By.CSS_SELECTOR, "#owed li") == []
    # The URL is stable: pasted into a fresh tab, it shows the same.
    await asyncio.to_thread(browser.get, url + "/orders/cs-1")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline tr.step")) == len(kinds)


async def test_with_delivery_stopped_a_paid_and_reserved_order_shows_delivery_owing_in_red(
    start_flow: StartFlow, console: Callable[[Flow], Any], browser: WebDriver
) -> None:
    flow = await start_flow({"delivery": 0})
    url = await console(flow)
    await flow.publish(order("cd-1"))

    async def paid_and_reserved() -> bool:
        seen = (await flow.by_order()).get("cd-1", [])
        return {"payments.succeeded", "stock.reserved"} <= set(seen)

    await value_when(paid_and_reserved, bool, 10, "paid and reserved")
    await asyncio.to_thread(browser.get, url + "/orders/cd-1")
    owing = browser.find_elements(By.CSS_SELECTOR, '#owed li.owing[data-function="delivery"]')
    assert len(owing) == 1, browser.page_source
    assert "delivery.scheduled" in owing[0].text
    assert owing[0].value_of_css_property("color") in ("rgba(198, 40, 40, 1)", "rgb(198, 40, 40)")
    assert browser.find_element(By.ID, "outcome").get_attribute("data-outcome") == "unfinished"
    # The stuck page groups it under the step it waits on.
    await asyncio.to_thread(browser.get, url + "/stuck?older_than=0")
    waiting = browser.find_element(By.CSS_SELECTOR, 'section.waiting[data-function="delivery"]')
    assert waiting.find_elements(By.CSS_SELECTOR, 'li[data-order="cd-1"]')


async def test_an_orchestrated_order_shows_its_saga_and_its_deadline(
    start_flow: StartFlow, console: Callable[..., Any], browser: WebDriver
) -> None:
    flow = await start_flow({"delivery": 0}, mode="orchestration")
    url = await console(flow)
    await flow.publish(order("co-1"))

    async def scheduling() -> bool:
        return "saga.delivery.schedule" in (await flow.by_order()).get("co-1", [])

    await value_when(scheduling, bool, 15, "the saga at its delivery step")
    await asyncio.to_thread(browser.get, url + "/orders/co-1")
    saga = browser.find_element(By.ID, "saga")
    field = {row.get_attribute("data-field"): row.find_element(By.TAG_NAME, "td").text
             for row in saga.find_elements(By.CSS_SELECTOR, "tr")}  # fmt: skip
    assert field["step"] == "delivery" and field["outcome"] == "open", field
    assert field["deadline"].startswith("20"), field  # the pending alarm's time (RFC 3339)
    owing = browser.find_elements(By.CSS_SELECTOR, '#owed li.owing[data-function="delivery"]')
    assert owing and "saga.delivery.schedule" in owing[0].text


async def test_a_dead_letter_redriven_from_the_page_completes_the_order_once(
    start_flow: StartFlow,
    console: Callable[[Flow], Any],
    browser: WebDriver,
    variant_config: Callable[..., Path],
) -> None:
    flow = await start_flow(config_path=variant_config(*SHORTER))
    url = await console(flow)
    placed: OrderCreated = order("cl-1", token=DOWN_TOKEN)
    await flow.publish(placed)
    letters = await value_when(lambda: _letters(flow, "cl-1"), bool, 15, "the charge dead-lettered")
    [letter] = letters
    await SimulatedGateway(KvStore(flow.nc, "gateway")).restore()

    # From the order's page, through the dead letter that holds it, to its redrive.
    await asyncio.to_thread(browser.get, url + "/orders/cl-1")
    held = browser.find_element(By.CSS_SELECTOR, f'#owed a[href="/dead-letters/{letter}"]')
    await asyncio.to_thread(held.click)
    await until(lambda: browser.current_url.endswith(f"/dead-letters/{letter}"), 10, "letter")
    assert "failed 3 attempts" in browser.find_element(By.ID, "reason").text
    await asyncio.to_thread(browser.find_element(By.ID, "redrive").click)
    await until(lambda: "/dead-letters" in browser.current_url
                and browser.find_elements(By.ID, "message"), 10, "back on the list")  # fmt: skip

    await flow.wait_finished(["cl-1"], timeout=30)
    await flow.wait_quiet()
    seen = await flow.by_order()
    assert terminal_counts(seen, ["cl-1"]) == {"cl-1": 1}
    assert "orders.completed" in seen["cl-1"]
    assert await _letters(flow, "cl-1") == []
    await asyncio.to_thread(browser.get, url + "/orders/cl-1")
    assert browser.find_element(By.ID, "outcome").get_attribute("data-outcome") == "completed"


async def test_redriving_all_that_match_says_first_how_many_then_redrives_those(
    start_flow: StartFlow,
    console: Callable[..., Any],
    browser: WebDriver,
    variant_config: Callable[..., Path],
) -> None:
    flow = await start_flow(config_path=variant_config(*SHORTER))
    url = await console(flow)
    held = [order(f"cm-{i}", token=DOWN_TOKEN) for i in range(3)]
    await flow.publish(*held)

    async def all_held() -> list[int]:
        found = [i for o in held for i in await _letters(flow, o.order_id)]
        return found if len(found) == len(held) else []

    await value_when(all_held, bool, 20, "the three charges dead-lettered")
    await SimulatedGateway(KvStore(flow.nc, "gateway")).restore()
    await asyncio.to_thread(browser.get, url + "/dead-letters")
    form = browser.find_element(By.ID, "redrive-matching")
    form.find_element(By.NAME, "function").send_keys("payment")
    form.find_element(By.NAME, "reason").send_keys("GatewayUnavailable")
    await asyncio.to_thread(browser.find_element(By.ID, "dry-run").click)
    matched = await until(lambda: browser.find_elements(By.ID, "matched"), 10, "the dry run")
    assert matched[0].get_attribute("data-count") == "3"
    assert await _letters(flow, held[0].order_id)  # a dry run redrives nothing
    # The form keeps the filter; the real run redrives exactly those.
    await asyncio.to_thread(browser.find_element(By.ID, "redrive-all").click)
    message = await until(lambda: browser.find_elements(By.ID, "message"), 10, "the redrive")
    assert message[0].text.startswith("redrove 3 dead letters"), message[0].text
    ids = [o.order_id for o in held]
    await flow.wait_finished(ids, timeout=30)
    await flow.wait_quiet()
    seen = await flow.by_order()
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    assert [await _letters(flow, o) for o in ids] == [[], [], []]


async def test_a_redrive_without_the_pages_token_is_refused(
    start_flow: StartFlow, console: Callable[[Flow], Any], browser: WebDriver
) -> None:
    flow = await start_flow()
    url = await console(flow)
    # A form on another origin, posting to the console: no token, a foreign Origin.
    await asyncio.to_thread(browser.get, url + "/dead-letters")
    status = browser.execute_script(
        "return fetch('/dead-letters/redrive', {method: 'POST', body: 'action=redrive',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}}).then(r => r.status);"
    )
    assert status == 403


async def test_a_read_only_console_shows_no_action_and_refuses_every_post(
    start_flow: StartFlow, console: Callable[..., Any], browser: WebDriver
) -> None:
    flow = await start_flow()
    url = await console(flow, "--read-only")
    await asyncio.to_thread(browser.get, url + "/dead-letters")
    assert browser.find_elements(By.TAG_NAME, "h1")[0].text == "Dead letters"
    assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == []

    def post(path: str) -> int:
        request = urllib.request.Request(url + path, data=b"action=redrive", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return int(refused.code)

    assert await asyncio.to_thread(post, "/dead-letters/redrive") == 403
    assert await asyncio.to_thread(post, "/dead-letters/1/redrive") == 403


async def _letters(flow: Flow, order_id: str) -> list[int]:
    return [d.id for d in await flow.dead_letters() if f'"{order_id}"' in d.data.decode()]


async def test_an_order_cancelled_from_its_page_ends_cancelled_naming_the_request(
    start_flow: StartFlow, console: Callable[[Flow], Any], browser: WebDriver
) -> None:
    flow = await start_flow({"delivery": 0})  # held paid and reserved
    url = await console(flow)
    await flow.publish(order("cc-1"))

    async def paid_and_reserved() -> bool:
        return {"payments.succeeded", "stock.reserved"} <= set(
            (await flow.by_order()).get("cc-1", [])
        )

    await value_when(paid_and_reserved, bool, 10, "paid and reserved")
    await asyncio.to_thread(browser.get, url + "/orders/cc-1")
    browser.find_element(By.ID, "cancel-reason").send_keys("customer changed their mind")
    await asyncio.to_thread(browser.find_element(By.ID, "cancel-order").click)
    message = await until(lambda: browser.find_elements(By.ID, "message"), 10, "the answer")
    assert message[0].text.startswith("accepted: cancelled on this request"), message[0].text

    seen = await flow.wait_finished(["cc-1"], timeout=30)
    assert "orders.cancelled" in seen["cc-1"] and "delivery.scheduled" not in seen["cc-1"]
    await asyncio.to_thread(browser.get, url + "/orders/cc-1")
    assert browser.find_element(By.ID, "outcome").get_attribute("data-outcome") == "cancelled"
    assert not browser.find_elements(By.ID, "cancel-order")  # nothing left to cancel
    [asked] = browser.find_elements(By.CSS_SELECTOR, "#asides tr.intervention")
    assert "customer changed their mind" in asked.text and "accepted" in asked.text
    assert {"payments.refunded", "stock.released"} <= set(seen["cc-1"])
