#!/usr/bin/env python3
"""Render a vizdeconv HTML report in headless Chromium and fail on any problem.

The report is opened straight from disk (file://, no server), the way a user opens
it offline, so every image must decode, every link must resolve to a file (inside the
output folder, or an input image still where the run found it), the channel-view routes
(``#<slug>/<channel>``) and their keys must work, and the browser must log no error. Screenshots are written for a human to look at.

Usage: python scripts/check_report.py OUT [--screenshots DIR]
Exit status: 0 all well, 1 problems found (one line each), 2 cannot check at all.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

try:
    from playwright.sync_api import ConsoleMessage, Page, Request, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError as exc:  # main() turns this into exit status 2
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

CHROMIUM = "/usr/bin/chromium"
# Root on a machine without network: no sandbox, and nothing that phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 5_000  # any single wait: a local page that takes longer is broken
IMAGES_TIMEOUT_MS = 60_000  # all images of a big report, decoded from disk
MAX_ROUTES = 20
MAX_SHOT_HEIGHT = 4000
ROUTE = re.compile(r"#?([^/#]+)/([^/]+)")  # "#<slug>/<channel>", the channel-view contract
UNSAFE_IN_FILENAME = re.compile(r"[^\w.-]+")

EAGER_JS = "() => { for (const img of document.images) img.loading = 'eager'; }"
# An <img> with no src at all is a placeholder (the channel view's figure before a
# route is opened), not a broken image; src="" is still reported.
IMAGES_JS = """() => [...document.images]
  .filter(img => img.getAttribute('src') !== null || img.srcset)
  .map(img => ({src: img.getAttribute('src') ?? img.srcset, ok: img.complete && img.naturalWidth > 0}))"""
LINKS_JS = "() => [...document.querySelectorAll('a[href]')].map(a => [a.getAttribute('href'), a.href])"
CHANNEL_HREFS_JS = "() => [...document.querySelectorAll('a.channel')].map(a => a.getAttribute('href'))"
IDS_JS = "() => [...document.querySelectorAll('[id]')].map(e => e.id)"
VIEW_SHOWN_JS = """(want) => {
  const view = document.getElementById('view');
  const box = view && !view.hidden && view.getBoundingClientRect();
  return Boolean(box && box.width > 0 && box.height > 0) === want;
}"""
FIGURE_JS = """() => {
  const img = document.querySelector('#view img#view-figure');
  return img && {src: img.getAttribute('src'), ok: img.naturalWidth > 0};
}"""
# One frame and one task later, the page's hashchange handler has run.
SETTLE_JS = "() => new Promise(done => requestAnimationFrame(() => setTimeout(done)))"
SECTIONS_JS = """() => {
  const first = {};
  for (const s of document.querySelectorAll('section[data-kind]')) {
    const r = s.getBoundingClientRect();
    first[s.dataset.kind] ??= {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height};
  }
  return first;
}"""


def slug_of(route: str) -> str | None:
    """The layer slug of a channel-view route, None when the hash is no route."""
    match = ROUTE.fullmatch(route)
    return match and match.group(1)


def spread(items: list[str], count: int) -> list[str]:
    """Up to `count` items evenly spaced from first to last, so a sample covers every layer."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


class ReportChecker:
    """One browser page on the report, collecting problems and the summary of each check."""

    def __init__(self, page: Page, out: Path, shots_dir: Path) -> None:
        self.page = page
        self.out = out
        self.shots_dir = shots_dir
        self.problems: list[str] = []
        self.shots: list[Path] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err.message}"))
        page.on("requestfailed", self._on_request_failed)

    def _on_console(self, msg: ConsoleMessage) -> None:
        """Console errors (failed loads, script errors) are problems even when nothing looks wrong."""
        if msg.type == "error":
            where = msg.location.get("url")
            self.problems.append(f"console error: {msg.text}" + (f" ({where})" if where else ""))

    def _on_request_failed(self, request: Request) -> None:
        """Any failed request means a missing file or an attempt to reach the network."""
        self.problems.append(f"failed request: {request.url} ({request.failure})")

    def wait(self, js: str, arg: object = None, timeout: int = TIMEOUT_MS) -> bool:
        """Wait until the JS predicate holds; False on timeout, for the caller to report."""
        try:
            self.page.wait_for_function(js, arg=arg, timeout=timeout)
        except PlaywrightError:
            return False
        return True

    def hash(self) -> str:
        """The current route, as the view's keys and links leave it."""
        return self.page.evaluate("() => location.hash")

    def screenshot(self, name: str, **options: object) -> None:
        """Write one PNG and remember its path for the summary."""
        path = self.shots_dir / name
        self.page.screenshot(path=path, **options)
        self.shots.append(path)

    def check_images(self) -> str:
        """Lazy images below the fold never load by themselves, so force them all, then require pixels."""
        self.page.evaluate(EAGER_JS)
        # On timeout, images still loading are reported as broken below.
        self.wait("() => [...document.images].every(img => img.complete)", timeout=IMAGES_TIMEOUT_MS)
        images = self.page.evaluate(IMAGES_JS)
        self.problems += [f"broken image: {img['src']}" for img in images if not img["ok"]]
        return f"images: {len(images)} checked"

    def link_problem(self, href: str, ids: set[str]) -> str | None:
        """Why the browser-resolved `href` would not work offline from OUT, or None when it works."""
        url = urlsplit(href)
        if url.scheme != "file" or url.netloc:
            return "external link, the report must work offline"
        path = Path(url2pathname(url.path)).resolve()
        if not path.is_relative_to(self.out):  # the inputs' own files: fine while they are there
            return None if path.is_file() else "no such file outside OUT"
        if not path.is_file():
            return "no such file"
        fragment = unquote(url.fragment)
        if path != self.out / "index.html" or not fragment or fragment in ids:
            return None
        if slug_of(fragment) in ids:  # a channel-view route to an existing layer section
            return None
        return f"no element with id {fragment!r}"

    def check_links(self) -> str:
        """Every link must lead to something that exists offline; each distinct href is checked once."""
        links = self.page.evaluate(LINKS_JS)
        ids = set(self.page.evaluate(IDS_JS))
        distinct = dict(map(tuple, links))
        for raw, href in distinct.items():
            if why := self.link_problem(href, ids):
                self.problems.append(f"broken link: {raw} ({why})")
        return f"links: {len(links)} checked ({len(distinct)} distinct)"

    def take_page_screenshots(self) -> None:
        """Full page, then the first section of each kind, clipped so a huge section stays viewable."""
        self.screenshot("overview.png", full_page=True)
        for kind, box in self.page.evaluate(SECTIONS_JS).items():
            if box["width"] > 0 and box["height"] > 0:
                clip = {**box, "height": min(box["height"], MAX_SHOT_HEIGHT)}
                name = UNSAFE_IN_FILENAME.sub("_", kind)
                self.screenshot(f"section-{name}.png", full_page=True, clip=clip)

    def check_view(self, route: str, how: str) -> None:
        """After `how` led to `route`, #view must be visible and its figure must load."""
        if not self.wait("(h) => location.hash === h", route):
            self.problems.append(f"channel view: {how} did not go to {route} (at {self.hash() or 'no hash'})")
            return
        self.page.evaluate(SETTLE_JS)
        if not self.wait(VIEW_SHOWN_JS, True):
            self.problems.append(f"channel view: {route} does not show a visible #view")
            return
        self.wait("() => document.querySelector('#view img#view-figure')?.complete")
        figure = self.page.evaluate(FIGURE_JS)
        if not figure:
            self.problems.append(f"channel view: {route} shows #view without <img id=\"view-figure\">")
        elif not figure["ok"]:
            self.problems.append(f"broken image: {figure['src']} (channel view {route})")

    def press(self, key: str, expected: Callable[[str], bool], description: str) -> bool:
        """Press `key` in the open view; the route it goes to must match the contract and show its figure."""
        before = self.hash()
        self.page.keyboard.press(key)
        self.wait("(h) => location.hash !== h", before)
        after = self.hash()
        if after == before:
            self.problems.append(f"channel view: {key} from {before} did not change the route")
            return False
        if not (slug_of(after) and expected(after)):
            self.problems.append(f"channel view: {key} from {before} went to {after or 'no hash'}, "
                                 f"expected {description}")
            return False
        self.check_view(after, f"{key} from {before}")
        return True

    def check_channel_views(self) -> str:
        """Exercise the channel-view contract: open by click, walk with the keys, close, sample routes."""
        hrefs = self.page.evaluate(CHANNEL_HREFS_JS)
        if not hrefs:
            return "channel views: none (no a.channel links), skipped"
        routes = [h for h in hrefs if h.startswith("#") and slug_of(h)]
        self.problems += [f"channel view: a.channel href {h} is not a #<slug>/<channel> route"
                          for h in hrefs if h not in routes]
        if not routes:
            return "channel views: no a.channel has a route"
        by_slug: dict[str, list[str]] = defaultdict(list)
        for route in routes:
            by_slug[slug_of(route)].append(route)
        first, slug = routes[0], slug_of(routes[0])

        self.page.locator("a.channel").first.click()
        self.check_view(first, "clicking the first a.channel")
        self.screenshot("channel-view.png")
        # The backward key is only meaningful once the forward key has moved away.
        keys = []
        if len(by_slug[slug]) >= 2:
            if self.press("ArrowRight", lambda h: slug_of(h) == slug, f"another {slug} channel"):
                self.press("ArrowLeft", lambda h: h == first, first)
            keys += ["ArrowRight", "ArrowLeft"]
        if len(by_slug) >= 2:
            if self.press("ArrowDown", lambda h: slug_of(h) != slug, "another layer"):
                self.press("ArrowUp", lambda h: slug_of(h) == slug, f"back to {slug}")
            keys += ["ArrowDown", "ArrowUp"]
        self.page.keyboard.press("Escape")
        keys.append("Escape")
        if not self.wait(VIEW_SHOWN_JS, False):
            self.problems.append("channel view: Escape did not hide #view")

        sample = spread(routes, MAX_ROUTES)
        for route in sample:
            self.page.evaluate("(h) => { location.hash = h; }", route)
            self.check_view(route, f"setting location.hash to {route}")
        return (f"channel views: {len(sample)} of {len(routes)} routes visited "
                f"in {len(by_slug)} layers; keys checked: {', '.join(keys)}")


def check(out: Path, shots_dir: Path) -> tuple[list[str], list[str]] | str:
    """Run every check in one browser session: (summary lines, problems), or why Chromium did not start."""
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            return f"cannot start {CHROMIUM}: {exc.message.splitlines()[0]}"
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        checker = ReportChecker(page, out, shots_dir)
        page.goto((out / "index.html").as_uri())
        summary = [checker.check_images(), checker.check_links()]
        checker.take_page_screenshots()  # before any channel view covers the page
        summary.append(checker.check_channel_views())
        browser.close()
    summary.append(f"screenshots: {len(checker.shots)} written")
    summary += [f"  {path}" for path in checker.shots]
    return summary, list(dict.fromkeys(checker.problems))


def main(argv: list[str] | None = None) -> int:
    """Check OUT's report; exit 2 before starting when there is nothing or nothing to check with."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="vizdeconv output folder holding index.html")
    parser.add_argument("--screenshots", type=Path,
                        help="where PNGs go (default: a check-report folder next to OUT)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if not (out / "index.html").is_file():
        print(f"check_report: no report at {out / 'index.html'}", file=sys.stderr)
        return 2
    if IMPORT_ERROR:
        print(f"check_report: playwright is not installed ({IMPORT_ERROR}); pip install playwright",
              file=sys.stderr)
        return 2
    shots_dir = (args.screenshots or out.parent / "check-report").resolve()
    shots_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    result = check(out, shots_dir)
    if isinstance(result, str):
        print(f"check_report: {result}", file=sys.stderr)
        return 2
    summary, problems = result
    print(*summary, sep="\n")
    for problem in problems:
        print(problem)
    verdict = f"{len(problems)} problems" if problems else "OK"
    print(f"{verdict} ({out / 'index.html'}, {time.monotonic() - started:.1f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
