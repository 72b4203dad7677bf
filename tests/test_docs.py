"""The documentation: the site builds offline with warnings as errors, its references are generated
from the code, every example of README.md and of the pages runs (tests/doc_examples.py says how), and
the built site works in a real browser (headless Chromium, as the report's browser tests)."""
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from doc_examples import BUILTIN_MIXERS, DOCS, ROOT, Page, _mixers, _registry, blocks, pages
from test_report_browser import browser  # noqa: F401  (the fixture: Debian's chromium through Playwright)

from spach.battle import schema
from spach.cli import build_parser
from spach.models.mixers import list_mixers

EXAMPLES = [(path, i) for path in pages() for i, b in enumerate(blocks(path))]
README_LINES = 150
# Pages that run the same battle share their folder, so the second one resumes it instead of training it again
# (each still runs it from scratch when selected alone).
SHARED_FOLDER = {"README.md": "tiny-battle", "docs/tutorials/first-battle.md": "tiny-battle"}


# -- the examples ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_pages(tmp_path_factory):
    return {}


def _folder(path: Path, factory) -> Path:
    shared = SHARED_FOLDER.get(str(path.relative_to(ROOT)))
    if shared is None:
        return factory.mktemp(path.stem)
    folder = factory.getbasetemp() / shared
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.parametrize("path,index", EXAMPLES, ids=[blocks(p)[i].name + "-" + blocks(p)[i].lang for p, i in EXAMPLES])
def test_example_runs(path, index, example_pages, tmp_path_factory, monkeypatch):
    before = list_mixers()  # (other test modules register test mixers of their own: only the example's count)
    page = example_pages.get(path)
    if page is None:
        page = example_pages[path] = Page(path, _folder(path, tmp_path_factory))
    block = page.blocks[index]
    monkeypatch.chdir(page.folder)
    monkeypatch.setenv("TORCH_HOME", str(page.folder / ".torch"))
    monkeypatch.setenv("SPACH_WEIGHTS_URL", str(page.folder / "no-weights-offline"))  # an unmarked download fails
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    page.run_until(index)
    assert list_mixers() == before, "an example left a mixer registered for the tests after it"
    if block.skip:
        pytest.skip(f"{block.name}: {block.skip}")


def test_the_runner_counts_and_checks_what_it_runs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('<!-- skip: needs a GPU -->\n```bash\nmake battle\n```\n\n'
                    '<!-- shorten: "--epochs 300" => "--epochs 1" -->\n```bash\nspach train --epochs 300 \\\n    --model x\n```\n\n'
                    '```console\n$ spach models\nmodel  family\n```\n\n```bash\nmake test\n```\n\n'
                    '<!-- skipp: typo -->\n```python\n```\n')
    with pytest.raises(ValueError, match="unknown example mark 'skipp'"):
        blocks(page)
    page.write_text(page.read_text().replace("skipp", "skip"))
    skipped, shortened, console, make, python = blocks(page)
    assert skipped.skip == "needs a GPU" and skipped.counts == 0
    assert shortened.commands() == [["train", "--epochs", "1", "--model", "x"]]
    assert console.commands() == [["models"]] and python.counts == 1
    with pytest.raises(ValueError, match="'make test' is not a spach command"):
        make.commands()


def test_the_runner_fails_a_failing_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "page.md").write_text("```bash\nspach models 'no_such_model_*'\n```\n\n```python\nassert 1 == 2\n```\n")
    page = Page(tmp_path / "page.md", tmp_path)
    with pytest.raises(AssertionError, match="exited with status 2"):
        page.run_until(0)
    with pytest.raises(AssertionError, match="an earlier example of this page failed"):
        page.run_until(1)


def test_examples_are_counted():
    total = sum(b.counts for p in pages() for b in blocks(p))
    skipped = [b for p in pages() for b in blocks(p) if b.skip]
    print(f"{total} examples run, {len(skipped)} blocks skipped with their reason")
    assert total >= 30 and all(b.skip.strip() for b in skipped)


# -- the README ---------------------------------------------------------------------------------------

def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", target):
            assert (ROOT / unquote(target)).exists(), f"README links to a missing file: {target}"


def test_readme_mixer_table_lists_every_registered_mixer():
    text = (ROOT / "README.md").read_text()
    table = text.split("## The mixers", 1)[1].split("\n\n", 2)[1]
    named = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    with _mixers(_registry(BUILTIN_MIXERS)):  # spach's own, not the ones other test modules register
        assert sorted(named) == list_mixers()


# -- the site -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built as `make docs` builds it; any attempt to reach the network fails (a dead proxy)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", "-d",
                        str(out / "doctrees"), str(DOCS), str(out / "html")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    return out / "html"


def test_docs_build_offline_with_warnings_as_errors(site):
    for page in ("index", "tutorials/first-battle", "how-to/slurm", "reference/cli", "explanation/verdicts",
                 "benchmarks", "battles/default/report"):
        assert (site / f"{page}.html").is_file(), page
    assert not list(site.rglob("pending*")), "docs/pending is left out of the site"


def test_cli_reference_is_the_parser(site):
    html = (site / "reference" / "cli.html").read_text()
    shown = {word.split()[0] for kbd in re.findall(r"<kbd>(.*?)</kbd>", html) for word in kbd.split(", ")}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f'id="spach-{name}"' in html, name
        for action in parser._actions:
            for option in action.option_strings:
                assert option in shown or option in ("-h", "--help"), f"spach {name} {option}"
    assert "%%" not in html  # argparse's escape of %


def test_study_file_reference_is_the_schema(site):
    html = (site / "reference" / "study-file.html").read_text()
    for table in schema.TABLES:
        assert f'id="table-{table}"' in html, table
    for key in [*schema.STUDY_KEYS, *schema.ARM_KEYS, *schema.CONTESTANT_KEYS, *schema.SLURM_KEYS, *schema.DATA_FIELDS]:
        assert f'<span class="pre">{key}</span>' in html, key
    for meaning in [*schema.TABLES.values(), *schema.STUDY_KEYS.values(), *schema.ARM_KEYS.values(),
                    *schema.CONTESTANT_KEYS.values(), *(r.help for r in schema.SLURM_KEYS.values())]:
        assert meaning.strip().endswith(".")  # every table and key says what it means


# -- the site in a browser ----------------------------------------------------------------------------

@pytest.mark.browser
def test_every_page_loads_in_chromium_without_errors_or_outside_requests(browser, site):  # noqa: F811
    root = site.resolve().as_uri() + "/"
    html = sorted(site.rglob("*.html"))
    assert len(html) >= 25
    for path in html:
        page = browser.new_page()
        errors, outside = [], []
        page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((root, "data:")) else None)
        page.goto(path.resolve().as_uri(), wait_until="load")
        broken = page.evaluate("Promise.all([...document.images].map(i => i.decode().then(() => 0, () => i.src)))")
        page.wait_for_load_state("networkidle")
        name = path.relative_to(site)
        assert errors == [] and outside == [] and not any(broken), f"{name}: {errors} {outside} {broken}"
        page.close()


@pytest.mark.browser
def test_search_finds_first_wave(browser, site):  # noqa: F811
    page = browser.new_page()
    page.goto((site / "search.html").resolve().as_uri() + "?q=first_wave", wait_until="load")
    hits = page.locator("#search-results ul.search li a")
    hits.first.wait_for(timeout=60_000)
    found = [unquote(h) for h in hits.evaluate_all("links => links.map(a => a.getAttribute('href'))")]
    assert any("reference/study-file" in h for h in found) and any("how-to/design-a-study" in h for h in found), found
    page.close()
