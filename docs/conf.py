"""Sphinx configuration of the spach documentation site (`make docs`: offline, warnings as errors)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # the package, also when it is not installed

project = "spach"
author = "the spach developers"
copyright = "the spach developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxarg.ext",
    "spach_docs",
]
# Nothing is fetched at build time or by the pages: no intersphinx, no math from a CDN (formulas are code).
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": False}
# Types of other libraries have no page here (no intersphinx: the build is offline).
nitpick_ignore_regex = [
    ("py:class", r"(torch|nn|timm|numpy|np|pathlib|argparse|collections|typing|types)\b.*"),
    ("py:class", r"(Path|Tensor|Module|Any|Callable|Iterable|Sequence|Mapping|Optional|Union)"),
]

html_theme = "furo"
html_title = "spach"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
pygments_style = "sphinx"
default_role = "literal"  # `x` in docstrings and --help texts (reStructuredText) is code, as in the Markdown pages
