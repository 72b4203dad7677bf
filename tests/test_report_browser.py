"""The battle report opened in a real browser: headless Chromium (Debian's `chromium` package, driven by
Playwright; Playwright's own browser download is not used). Every image decodes, nothing is logged
to the console, no request leaves the file (self-contained), the findings table is there, and text
holding `<`, `&` and quotes shows as text.

`make test` installs what this needs (as root: apt chromium; pip playwright via the test extra).
Without them the tests skip, saying why; under CI (env CI set) they fail instead."""
import os
import shutil
from pathlib import Path

import pytest
from test_report import STUDY, make_folder

from spach.battle.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SPACH_CHROMIUM", "/usr/bin/chromium")
# headless, and nothing of Chromium's own reaches for the network (updates, sync, QUIC probes)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FIGURES = 6  # test_report's study yields every figure
# a study whose every free-text field holds markup, entities and quotes
NASTY_NAME = """<b>bold</b> & "double" 'single' <!-- x"""  # a contestant's label (names themselves are folder names)
NASTY_DESCRIPTION = """a < b && c > "d" <script>window.pwned = 1</script>"""
NASTY_NOTES = """<img src=x onerror="window.pwned = 2"> &amp; stays &amp; 'quoted'"""


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401  (only: is it installed?)
    except ImportError:
        return "Playwright is not installed (pip install 'spach[test]', or run make test)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (as root: apt-get install chromium, which make test does; or set SPACH_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _why_no_browser()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), headless=True,
                                                       executable_path=CHROMIUM, args=FLAGS, offline=True)
        yield context
        context.close()


class Opened:
    """A page with everything it logged and requested while loading."""

    def __init__(self, context, path: Path):
        self.page = context.new_page()
        self.console, self.requests = [], []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.console.append(f"request failed: {r.url}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url, wait_until="load")
        # each image's natural width once decoded; 0 when it cannot be (decode() rejects for a broken image)
        self.widths = self.page.evaluate("Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth, () => 0)))")
        self.page.wait_for_load_state("networkidle")

    def outside_requests(self) -> list[str]:
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


def test_report_in_chromium(browser, tmp_path):
    out = make_folder(tmp_path)
    page = Opened(browser, write_report(out))
    assert len(page.widths) == FIGURES and all(w > 0 for w in page.widths)
    assert page.console == [] and page.outside_requests() == []
    findings = page.page.locator("table", has=page.page.locator("th", has_text="finding (paper)"))
    assert findings.count() == 1
    rows = findings.locator("tr").all_inner_texts()
    assert len(rows) == 6 and rows[1].split("\t")[:4] == ["1", "Multi-stage layouts beat single-stage ones at equal cost", "main",
                                                         "supported"]
    page.page.close()


def test_markup_in_names_renders_as_text(browser, tmp_path):
    text = STUDY.replace('name = "fake"', f"name = \"fake\"\ndescription = {toml_string(NASTY_DESCRIPTION)}")
    text = text.replace('name = "conv-ms"', f'name = "conv-ms"\nlabel = {toml_string(NASTY_NAME)}')
    text = text.replace('notes = "Made by hand."', f"notes = {toml_string(NASTY_NOTES)}")
    out = make_folder(tmp_path, study_text=text, failed=[("attn-ms", 2)])
    (out / "runs" / "attn-ms" / "seed2.error.txt").write_text("Traceback ...\nValueError: expected <int> & got \"str\"\n")
    page = Opened(browser, write_report(out))
    p = page.page
    assert p.title() == "spach battle: fake"
    body = p.locator("body").inner_text()
    for shown in (f"conv-ms ({NASTY_NAME})", NASTY_DESCRIPTION, NASTY_NOTES, 'ValueError: expected <int> & got "str"'):
        assert shown in body
    assert p.evaluate("window.pwned") is None  # no script ran, no handler fired
    assert p.locator("body b, body script").count() == 0 and len(page.widths) == FIGURES
    assert page.console == [] and page.outside_requests() == []
    p.close()


def test_the_checks_catch_a_page_that_is_not_self_contained(browser, tmp_path):
    """The harness itself: an outside image is seen as a request and logged as an error."""
    page_file = tmp_path / "leaky.html"
    page_file.write_text('<!doctype html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    page = Opened(browser, page_file)
    assert page.outside_requests() == ["http://127.0.0.1:9/x.png"] and page.widths == [0]
    assert "request failed: http://127.0.0.1:9/x.png" in page.console
    page.page.close()
