"""Reference pages generated from the code at build time, so they cannot drift from it:

- ``study-schema``: the study file, table by table and key by key (`spach.battle.schema`, the defaults of
  `spach.battle.study`'s dataclasses, `TrainConfig`'s fields and help, the questions of
  `spach.battle.questions`);
- ``model-zoo``: `spach models` as a table (`spach.models.table.model_rows`);
- ``mixer-table``: the registered spatial mixers, their classes and what each takes from the block.

The CLI reference comes from the real parser through sphinx-argparse (`spach.cli.build_parser`).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

TOML_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def inline(text: str) -> list[nodes.Node]:
    """Text with `code` spans (the docstrings' and schema descriptions' one markup) as docutils nodes."""
    parts = text.split("`")
    return [nodes.literal(p, p) if i % 2 else nodes.Text(p) for i, p in enumerate(parts) if p]


def paragraph(text: str) -> nodes.paragraph:
    return nodes.paragraph("", "", *inline(text))


def table(header: list[str], rows: list[list[str]], widths: list[int]) -> nodes.table:
    """A table of inline-marked cells; the first column is code (a key, a name)."""
    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=w) for w in widths]
    head, body = nodes.thead(), nodes.tbody()
    for cells, part in [(header, head)] + [(r, body) for r in rows]:
        row = nodes.row()
        for i, cell in enumerate(cells):
            entry = nodes.entry()
            if part is body and i == 0:
                entry += nodes.paragraph("", "", nodes.literal(cell, cell))
            else:
                entry += paragraph(cell)
            row += entry
        part += row
    group += [head, body]
    return nodes.table("", group, classes=["longtable"])


def toml_value(value: Any) -> str:
    """A default as it is written in TOML."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (list, dict)) and not value:
        return "`[]`" if isinstance(value, list) else "`{}`"
    return f"`{value!r}`"


def toml_type(annotation: Any) -> str:
    text = str(getattr(annotation, "__name__", annotation))
    if text.startswith(("list", "tuple")):
        return "array"
    if text.startswith("dict"):
        return "table"
    return TOML_TYPES.get(text, text)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


class GeneratedSection(SphinxDirective):
    """A directive that returns sections of its own (titles reach the page's table of contents)."""

    def section(self, title: str, anchor: str) -> nodes.section:
        sec = nodes.section(ids=[nodes.make_id(anchor)], names=[nodes.fully_normalize_name(anchor)])
        sec += nodes.title(title, "", *inline(title))
        self.state.document.note_implicit_target(sec, sec)
        return sec


class StudySchema(GeneratedSection):
    """Every table and key of a study file, from `spach.battle.schema`."""

    def run(self) -> list[nodes.Node]:
        from spach.battle import schema, study
        from spach.battle.questions import FINDINGS, NEEDS

        train = schema.train_fields()
        recipe_keys = [k for k in train if k not in schema.MANAGED and k not in schema.DATA_FIELDS]
        keyed = {"study": (schema.STUDY_KEYS, study.Study), "arm": (schema.ARM_KEYS, study.Arm),
                 "contestant": (schema.CONTESTANT_KEYS, study.Contestant)}
        out = []
        for name, meaning in schema.TABLES.items():
            sec = self.section(f"`[{name}]`" if name not in ("arm", "contestant") else
                               ("`[arm.NAME]`" if name == "arm" else "`[[contestant]]`"), f"table-{name}")
            sec += paragraph(meaning)
            if name in keyed:
                keys, cls = keyed[name]
                fields = {f.name: f for f in dataclasses.fields(cls)}
                rows = []
                for key, text in keys.items():
                    f = fields.get(key)
                    default = field_default(f) if f else dataclasses.MISSING
                    rows.append([key, toml_type(f.type) if f else "string",
                                 "-" if default is dataclasses.MISSING else toml_value(default), text])
                sec += table(["key", "type", "default", "meaning"], rows, [18, 8, 10, 64])
            elif name in ("data", "recipe"):
                keys = [k for k in train if k in schema.DATA_FIELDS] if name == "data" else recipe_keys
                sec += table(["key", "type", "default", "meaning"],
                             [[k, toml_type(train[k].type), toml_value(field_default(train[k])),
                               train[k].metadata["help"]] for k in keys], [18, 8, 14, 60])
            else:
                sec += table(["key", "type", "least", "meaning", "flag"],
                             [[k, toml_type(r.kind.__name__), "-" if r.least is None else str(r.least), r.help,
                               "-" if k == "extra" else f"`--{k.replace('_', '-')}`"]
                              for k, r in schema.SLURM_KEYS.items()], [16, 8, 6, 54, 16])
            if name == "recipe":
                sec += paragraph("Set by the battle itself for every run, so a study may not set them: "
                                 + ", ".join(f"`{k}`" for k in sorted(schema.MANAGED)) + ".")
            if name == "contestant":
                sec += paragraph("The recipe knobs a contestant may change on its own: "
                                 + ", ".join(f"`{k}`" for k in sorted(schema.CONTESTANT_KNOBS)) + ".")
            if name == "slurm":
                sec += paragraph("`extra` may not hold what a key above sets: "
                                 + ", ".join(f"`{k}`" for k in sorted(schema.SLURM_TAKEN)) + ".")
            out.append(sec)
        sec = self.section("Questions", "questions")
        sec += paragraph("The names `questions` (of `[study]` and of an arm), `rank` and `tested_elsewhere` take: "
                         "the paper's five findings (1-5) and the questions asked beyond them, and the contestants "
                         "each needs.")
        sec += table(["question", "finding", "needs"],
                     [[key, f"{n}. {text}", NEEDS[n]] for n, (key, text) in FINDINGS.items()], [16, 42, 42])
        out.append(sec)
        return out


class ModelZoo(SphinxDirective):
    """`spach models` as a table."""

    def run(self) -> list[nodes.Node]:
        from spach.models.table import model_rows

        rows = [[r["name"], r["family"], r["layout"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}",
                 "-" if r["top1"] is None else f"{r['top1']:.1f}", "yes" if r["weights"] else "-"]
                for r in model_rows()]
        return [table(["model", "family", "layout", "params (M)", "GMACs", "IN-1k top-1", "weights"], rows,
                      [34, 8, 12, 10, 8, 10, 8])]


class MixerTable(SphinxDirective):
    """The registered spatial mixers: name, class, what the constructor takes from the block, its docstring."""

    def run(self) -> list[nodes.Node]:
        from spach.models import mixers

        rows = []
        for name in mixers.list_mixers():
            if name in mixers.MIXERS_WITHOUT_MODULE:
                rows.append([name, "-", "-", "No module: the block's 3x3 depthwise conv (CPE) does the spatial "
                             "mixing, then the channel MLP."])
                continue
            cls = mixers._MIXERS[mixers._split(name)[0]]
            takes = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
            doc = " ".join((inspect.getdoc(cls) or "").split())
            rows.append([name, f"`{cls.__module__}.{cls.__qualname__}`", ", ".join(f"`{p}`" for p in takes) or "-",
                         doc])
        return [table(["mixer", "class", "takes", "what it does"], rows, [10, 30, 20, 40])]


def unescape_percent(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """argparse help strings write % as %%; sphinx-argparse shows them as they are written."""
    if docname == "reference/cli":
        for text in list(doctree.findall(nodes.Text)):
            if "%%" in text:
                text.parent.replace(text, nodes.Text(text.replace("%%", "%")))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-resolved", unescape_percent)
    app.add_directive("study-schema", StudySchema)
    app.add_directive("model-zoo", ModelZoo)
    app.add_directive("mixer-table", MixerTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
