"""Sphinx configuration of the pyro_nfmala documentation.

Build (what CI runs, warnings are errors so that a broken docstring or link fails it):

    python -m pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

and look at the pages with ``bash docs/screenshots.sh`` (headless Chromium).

Sphinx, because the docstrings are reStructuredText with Sphinx roles (as Pyro's and zuko's are)
and autodoc reads them as they are; MyST for the Markdown pages; the tutorials, ``# %%`` scripts
that jupytext reads, become pages at build time with the figures of their last full run.
"""

import os
import re
import sys

from pathlib import Path

import jupytext

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import pyro_nfmala  # noqa: E402

project = "pyro_nfmala"
author = "the pyro_nfmala authors"
copyright = "2026, the pyro_nfmala authors"
version = release = pyro_nfmala.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order, signatures without type hints (the docstrings say the shapes).
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each attribute

# Every cross-reference must resolve, so that a renamed function breaks the build instead of a link.
# Other projects' objects are written out (no inventories are fetched at build time).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pyro|zuko|arviz|numpy|np|xarray|matplotlib|collections|typing|abc)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Callable|Mapping|Sequence|Iterable|Iterator|optional|callable)"),
    (r"py:.*", r".*\._\w+"),  # private base classes shown by show-inheritance
    # "string": the return type in the docstrings that Pyro's MCMCKernel methods hand down
    (r"py:.*", r"(int|float|str|string|bool|dict|list|tuple|object|None)"),
]

html_theme = "furo"
html_title = f"pyro_nfmala {release}"
html_static_path = []
# MathJax comes from its CDN; an offline build can point at a local copy (for screenshots).
if os.environ.get("PYRO_NFMALA_MATHJAX"):
    mathjax_path = os.environ["PYRO_NFMALA_MATHJAX"]

# ---------------------------------------------------------------------------------------------
# Tutorials: tutorials/NN_topic.py (``# %%`` cells) -> docs/tutorials/NN_topic.md at build time.

TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
FIGURES = ROOT / "tutorials" / "figures"  # the pages show them from there (Sphinx copies them)
GENERATED = DOCS / "tutorials"


FIGURE_SAVED = re.compile(r'FIGURES\s*/\s*f?"([^"]+\.png)"')


def saved_figures(code: str, script: Path) -> list[str]:
    """The full-run PNGs that a code cell saves (``FIGURES / f"02_trace_{tag}{SUFFIX}.png"`` gives
    every ``02_trace_*.png``); a figure with no full-run PNG fails the build."""
    names = []
    for pattern in FIGURE_SAVED.findall(code):
        pattern = re.sub(r"\{[^}]*\}", "*", pattern.replace("{SUFFIX}", ""))
        found = sorted(p.name for p in FIGURES.glob(pattern) if "_smoke" not in p.stem)
        if not found:
            raise RuntimeError(f"{script.name} saves {pattern}, which no full run has made: run the tutorial")
        names += found
    return names


def tutorial_page(script: Path) -> str:
    """The Markdown page of one tutorial: its markdown cells as text, its code cells as code,
    each followed by the figures it saves (the PNGs of the last full run); the script itself is
    offered for download."""
    notebook = jupytext.read(script, fmt="py:percent")
    parts = []
    for number, cell in enumerate(notebook.cells):
        source = cell.source.strip("\n")
        if not source:
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
        else:
            parts.append(f"```python\n{source}\n```")
            parts += [f"![{name}](../../tutorials/figures/{name})" for name in saved_figures(source, script)]
        if number == 0:
            parts.append(
                f"{{download}}`Download the script <../../tutorials/{script.name}>` (jupytext opens it "
                f"as a notebook). The figures below are those of its last full run."
            )
    return "\n\n".join(parts) + "\n"


def write_tutorial_pages(app=None) -> None:
    for script in TUTORIALS:
        page = GENERATED / f"{script.stem}.md"
        text = tutorial_page(script)
        if not page.exists() or page.read_text() != text:  # unchanged pages are not rebuilt
            page.write_text(text)


# ---------------------------------------------------------------------------------------------
# API: ``pyro_nfmala.NFMALA`` is documented where it lives (``pyro_nfmala.kernel.NFMALA``); a
# reference by its public name (``pyro_nfmala.NFMALA``, or ``NFMALA`` in the API summary's one-line
# descriptions, read outside their module) resolves there.


def resolve_public_name(app, env, node, contnode):
    target = node.get("reftarget", "")
    name = target.removeprefix("pyro_nfmala.")
    if node.get("refdomain") != "py" or name not in pyro_nfmala.__all__:
        return None
    module = getattr(pyro_nfmala, name).__module__
    node["reftarget"] = f"{module}.{name}"
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], node, contnode
    )


def setup(app):
    app.connect("builder-inited", write_tutorial_pages)
    app.connect("missing-reference", resolve_public_name)
