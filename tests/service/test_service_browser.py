"""The explorer page (/ui) and the API docs (/docs, /redoc) in a real headless Chromium, offline.

Debian's chromium (``/usr/bin/chromium``; ``scripts/test.sh`` installs it) driven by Playwright
against a real uvicorn server: the page uploads an image, waits for the verdict and the heatmaps
to render, browses the atlas, and takes screenshots into the test's temporary folder.

Nothing may go to another host, checked twice. Every request a page starts is recorded
(Playwright sees them all, refused ones included); one that is not to the server must have been
refused inside the browser by the page's Content-Security-Policy. And Chromium's proxy is a local
recorder that every connection to a host other than loopback reaches (a host-resolver rule also
resolves no name but 127.0.0.1): it may see only Chromium's own background services (its updater,
sign-in and clock on Google's hosts, which it calls with a blank page too), never a page's host.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import LiveServer, build_registry

from models.explanation.atlas import AtlasConfig, compute_atlas

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes advise for a closed network: no background traffic, no first-run, no sandbox (root).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


#: Hosts Chromium itself calls in the background, whatever the page (seen with a blank page).
CHROMIUM_OWN = re.compile(r"^(CONNECT |[A-Z]+ http://)[a-z0-9.-]+\.(google\.com|googleapis\.com|gstatic\.com)[:/]")


class RecordingProxy:
    """Chromium's proxy: it records the first line of every connection (``CONNECT host:443``,
    ``GET http://host/...``) and closes it. Requests to loopback never go through a proxy."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def not_chromiums_own(self) -> list[str]:
        return [line for line in self.seen if not CHROMIUM_OWN.match(line)]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
                except OSError:
                    self.seen.append("(a connection that sent nothing)")

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def proxy() -> Iterator[RecordingProxy]:
    recorder = RecordingProxy()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def browser(proxy: RecordingProxy) -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium (Debian's package; scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*ARGS, f"--proxy-server=http://127.0.0.1:{proxy.port}"], headless=True
        )
        yield browser
        browser.close()


@pytest.fixture()
def ui_server(
    make_server: Callable[..., LiveServer], tiny_model: tuple, cifar_slice: Path, tmp_path: Path
) -> LiveServer:
    registry = build_registry(tmp_path / "ui-registry", tiny_model)
    atlas = compute_atlas(
        tiny_model[0],
        registry.load_feature_set("tiny"),
        cifar_slice / "train",
        config=AtlasConfig(top_k=4, tail_sample=2, batch_size=100),
    )
    atlas.meta.update(dataset="slice-train")
    registry.add_atlas("tiny", "atlas-ui", atlas)
    return make_server(registry_root=registry.root)


class Traffic:
    """Every request a page makes, failed ones, and the page's errors."""

    def __init__(self, page: Any, origin: str) -> None:
        self.origin = origin
        self.urls: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("requestfailed", lambda request: self.failed.append(f"{request.url} {request.failure}"))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))

    def elsewhere(self) -> list[str]:
        """Requests started for another host that were not refused by the page's CSP in the browser."""
        refused = {f.rsplit(" ", 1)[0] for f in self.failed if f.endswith(" csp")}
        return [
            u
            for u in self.urls
            if not (u.startswith(self.origin) or u.startswith(("data:", "blob:"))) and u not in refused
        ]


def test_ui_explains_an_uploaded_image_and_browses_the_atlas_offline(
    browser: Any, proxy: RecordingProxy, ui_server: LiveServer, cifar_slice: Path, tmp_path: Path
) -> None:
    image = sorted((cifar_slice / "test").rglob("*.jpg"))[3]
    expected = httpx.post(
        f"{ui_server.url}/score", files={"files": (image.name, image.read_bytes(), "image/jpeg")}, timeout=60
    ).json()["results"][0]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    traffic = Traffic(page, ui_server.url)
    page.set_default_timeout(60_000)
    page.goto(f"{ui_server.url}/ui/")
    page.wait_for_function("document.getElementById('serving').textContent.startsWith('serving model')")
    assert page.text_content("#serving") == "serving model tiny, feature set tiny"

    page.set_input_files("#files", str(image))
    page.wait_for_selector(".card[data-state=done]")
    card = page.locator(".card").first
    assert card.locator("h3").text_content() == image.name
    q = expected["q_score"]
    shown = f"{q:.2e}" if q != 0 and abs(q) < 0.01 else f"{q:.4f}"
    assert card.locator(".q").text_content() == shown.replace("e-0", "e-")
    reasons = card.locator(".reasons .badge").all_text_contents()
    assert reasons == (expected["reasons"] or ["no flag"])
    # why the typicality is what it is: the component that sets it, as /explain names it
    explained = httpx.post(
        f"{ui_server.url}/explain", files={"files": (image.name, image.read_bytes(), "image/jpeg")}, timeout=60
    ).json()["why"]
    why_lines = card.locator(".why").all_text_contents()
    assert len(why_lines) == (explained["typicality"] is not None) + (explained["risk"] is not None) >= 1
    assert explained["typicality"]["driver"] in why_lines[0]
    # the input and three heatmaps rendered (decoded PNGs of the encoder's 32x32 input)
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].length === 4 && "
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth === 32)"
    )
    assert card.locator("img.overlay").count() == 3

    rows = page.locator("#atlas-table tbody tr")
    index = httpx.get(f"{ui_server.url}/atlas", timeout=30).json()
    assert rows.count() == len(index["features"])
    feature = next(f for f in index["features"] if f["n_dominant"] > 0)
    page.click(f"#atlas-table tbody tr[data-feature='{feature['index']}']")
    page.wait_for_function(
        "(j) => document.getElementById('atlas-feature').dataset.feature === String(j) && "
        "document.querySelector('#atlas-feature img.sheet')?.naturalWidth > 0",
        arg=feature["index"],
    )
    assert f"feature {feature['index']}" in page.text_content("#atlas-feature h3")
    assert page.locator("#atlas-feature .bars > div").count() == len(
        httpx.get(f"{ui_server.url}/atlas/{feature['index']}", timeout=30).json()["classes"]
    )
    page.wait_for_function("!document.getElementById('monitor').textContent.includes('loading')")
    # the recent-traffic panel shows each served model's window (it showed nothing but "enabled")
    with image.open("rb") as f:
        scored = httpx.post(
            f"{ui_server.url}/score", files=[("files", (image.name, f.read(), "image/jpeg"))], timeout=30
        )
    assert scored.status_code == 200, scored.text
    window = httpx.get(f"{ui_server.url}/monitor", timeout=30).json()["models"][0]
    page.click("#monitor-refresh")
    page.wait_for_function(
        "(n) => [...document.querySelectorAll('#monitor dt')].some(d => d.textContent === 'images_seen' && "
        "d.nextElementSibling.textContent === String(n))",
        arg=window["images_seen"],
    )
    terms = page.locator("#monitor dt").all_text_contents()
    assert "model tiny, feature set tiny" in terms and {"estimated_error", "count", "mean_risk"} <= set(terms)
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    assert (tmp_path / "ui.png").stat().st_size > 10_000

    assert traffic.elsewhere() == [] and proxy.not_chromiums_own() == [], (traffic.elsewhere(), proxy.seen)
    assert not any(f.endswith(" csp") for f in traffic.failed)  # the explorer does not even try
    # /monitor may not exist on this server (its 404 is expected); nothing else may fail
    assert [u for u in traffic.failed if "/monitor" not in u] == []
    assert [e for e in traffic.errors if "/monitor" not in e and "404" not in e] == []
    page.close()


@pytest.mark.parametrize(("path", "ready"), [("/docs", ".swagger-ui .opblock"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_offline(
    browser: Any, proxy: RecordingProxy, ui_server: LiveServer, tmp_path: Path, path: str, ready: str
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    traffic = Traffic(page, ui_server.url)
    page.set_default_timeout(60_000)
    page.goto(f"{ui_server.url}{path}")
    page.wait_for_selector(ready)
    page.wait_for_function(
        "document.body.innerText.includes('/explain') || document.body.innerText.includes('Explain one image')"
    )
    name = path.strip("/")
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert traffic.elsewhere() == [] and proxy.not_chromiums_own() == [], (traffic.elsewhere(), proxy.seen)
    assert not any("redoc.ly" in line for line in proxy.seen)
    # ReDoc 2 asks for its logo at cdn.redoc.ly: the page's Content-Security-Policy refuses it in the
    # browser, so it never reaches the network (the proxy never saw it); any other error fails the test.
    assert [f for f in traffic.failed if not f.startswith("https://cdn.redoc.ly/")] == [], traffic.failed
    refused = [e for e in traffic.errors if "cdn.redoc.ly" in e and "Content Security Policy" in e]
    assert [e for e in traffic.errors if e not in refused] == [], traffic.errors
    assert len(refused) == (1 if path == "/redoc" else 0), traffic.errors
    page.close()
