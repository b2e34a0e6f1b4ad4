"""Look at a Netron page with headless Chromium: which nodes it drew, whether it showed an error, a PNG.

    python -m qcompiler.deploy.netron_browser MODEL --png OUT.png [--focus NODE_NAME]

Drives the system Chromium (Debian's ``chromium`` package, or ``$QCOMPILE_CHROMIUM``) through
Playwright's Python package; no browser is downloaded. Netron draws every node as an SVG group
whose id is ``node-name-<node name>``, so the names in the rendered page are read from the DOM
(``page.content()``: Netron's page forbids script evaluation). "No error" means Netron reached its
graph screen (``<body class="default">``, not ``alert`` or ``welcome``), its message box is
empty and the page threw nothing. Netron asks a first-time visitor for cookie consent; the
session sets that cookie first. Netron shows "Please update to the newest version" 180 days after
its build date: pin a newer ``netron`` when that message is reported.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qcompiler.errors import QCompileError, require

#: Graph screen reached (default) or an error box shown (alert).
SETTLED = "body.default, body.alert"
NODE_ID = re.compile(r'id="node-name-([^"]*)"')


def chromium_path() -> str | None:
    """The system Chromium, or None where none is installed."""
    if os.environ.get("QCOMPILE_CHROMIUM"):
        return os.environ["QCOMPILE_CHROMIUM"]
    return next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)


@dataclass(frozen=True)
class RenderedGraph:
    """What Netron's page showed."""

    node_names: frozenset[str]
    body_class: str
    message: str  # Netron's message box ("" when none)
    page_errors: tuple[str, ...]
    seconds: float

    @property
    def error(self) -> str | None:
        """Why this is not a rendered graph, or None."""
        if self.body_class.split()[:1] != ["default"]:
            return (f"Netron did not reach its graph screen (body class '{self.body_class}'): "
                    f"{self.message or 'no message'}")
        if self.message:
            return f"Netron shows a message: {self.message}"
        if self.page_errors:
            return f"the page threw: {self.page_errors[0]}"
        return None


def render(url: str, png: str | Path | None = None, focus: str | None = None, show_names: bool = False,
           zoom_out: int = 0, timeout_s: float = 180.0, viewport: tuple[int, int] = (1400, 1000)) -> RenderedGraph:
    """Open ``url`` (a Netron server) in headless Chromium and read back what it drew.

    ``show_names`` turns on View > Show Names (node names on the boxes, not op types);
    ``png``: a screenshot of the viewport after ``zoom_out`` clicks on Netron's zoom-out button,
    scrolled so that the node named ``focus`` is in its middle.
    """
    executable = chromium_path()
    if executable is None:
        raise QCompileError("Chromium not found: install Debian's chromium package (apt-get install chromium) "
                            "or set QCOMPILE_CHROMIUM")
    sync_api = require("playwright.sync_api", "netron_browser", extra="dev")
    errors: list[str] = []
    start = time.monotonic()
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox cannot start as root (CI containers).
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            context.add_cookies([{"name": "consent", "value": str(int(time.time() * 1000)), "url": url}])
            if show_names:  # Netron keeps its View options in localStorage under "options"
                context.add_init_script("window.localStorage.setItem('options', JSON.stringify({names: true}));")
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector(SETTLED, timeout=timeout_s * 1000)
            body_class = page.locator("body").get_attribute("class") or ""
            message = page.locator("#message-text").inner_text().strip()
            names = frozenset(html.unescape(name) for name in NODE_ID.findall(page.content()))
            if png is not None:
                for _ in range(zoom_out):
                    page.locator("#zoom-out-button").click()
                _screenshot(page, Path(png), focus, viewport)
        finally:
            browser.close()
    return RenderedGraph(names, body_class, message, tuple(errors), time.monotonic() - start)


def _screenshot(page, png: Path, focus: str | None, viewport: tuple[int, int]) -> None:
    if focus is not None:
        node = page.locator(f'[id="node-name-{focus}"]')
        if node.count() == 0:
            raise QCompileError(f"node '{focus}' is not in the rendered graph")
        # Netron's graph scrolls inside #target; center the node in it with the mouse wheel.
        node.scroll_into_view_if_needed()
        box = node.bounding_box()
        page.mouse.move(viewport[0] / 2, viewport[1] / 2)
        page.mouse.wheel(box["x"] + box["width"] / 2 - viewport[0] / 2, box["y"] + box["height"] / 2 - viewport[1] / 2)
        page.wait_for_timeout(300)
    png.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(png))


def main(argv: list[str] | None = None) -> int:
    from qcompiler.deploy import netron_view

    parser = argparse.ArgumentParser(prog="python -m qcompiler.deploy.netron_browser",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX model to open in Netron")
    parser.add_argument("--png", required=True, help="screenshot to write")
    parser.add_argument("--focus", help="node name to center the screenshot on")
    parser.add_argument("--names", action="store_true", help="View > Show Names: node names instead of op types")
    parser.add_argument("--zoom-out", type=int, default=0, help="clicks on Netron's zoom-out button")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    url = netron_view.serve(args.model)
    try:
        rendered = render(url, args.png, args.focus, show_names=args.names, zoom_out=args.zoom_out,
                          viewport=(args.width, args.height))
    finally:
        netron_view.stop(url)
    print(f"{len(rendered.node_names)} nodes rendered in {rendered.seconds:.1f} s; "
          f"{rendered.error or 'no Netron error'}; wrote {args.png}")
    return 0 if rendered.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
