"""Sphinx configuration of unmask's documentation (MyST Markdown pages, the furo theme, autodoc).

The reference pages under ``reference/`` that list the command line, the config keys and the samplers
are written from the code when the build starts (:func:`write_reference`), so they cannot drift from it.
Build: ``sphinx-build -W -n docs docs/_build/html`` (``tests/test_docs.py`` runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import unmask
from unmask.cli import build_parser
from unmask.config import CHOICES, config_keys
from unmask.samplers.block_diffusion import BlockSettings
from unmask.samplers.registry import BLOCKS, SAMPLERS, WINDOWS
from unmask.samplers.semi_ar import WindowSettings
from unmask.serve.app import create_app
from unmask.serve.service import ServeConfig

DOCS = Path(__file__).resolve().parent

project = "unmask"
release = version = unmask.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "unmask"
html_static_path = ["_static"]
exclude_patterns = ["_build"]

# The reference is generated from the docstrings; signatures show parameter names, the docstrings say the
# types and shapes (a signature's annotations would need every third-party inventory, which a build
# without network access cannot fetch).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # torch's own docstrings (autograd.Function.forward, ...) are not unmask's
autodoc_default_options = {"members": True, "show-inheritance": False}
# nitpicky cross-references: a docstring naming an unmask module, class or function that does not exist
# fails the build; names of other libraries (torch, transformers, ...) are not resolved without their
# inventories and are let through
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(torch|torchao|transformers|tokenizers|datasets|peft|safetensors|numpy|np|"
                                   r"fastapi|starlette|pydantic|lm_eval|typing|collections|pathlib|argparse|"
                                   r"dataclasses|enum|abc|os|io|json|re|pickle|F|nn)(\..*)?")]


def table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]) + "\n"


def cli_page() -> str:
    """Every command of ``unmask`` with every flag (from the parser itself)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# Command line\n", "Generated from `unmask.cli.build_parser` when the docs are built.\n"]
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        out.append(f"## `unmask {name}`\n\n{summaries.get(name) or ''}\n")
        out.append("```text\n" + command.format_usage().strip() + "\n```\n")
        rows = []
        for action in command._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest}`"
            choices = ", ".join(map(str, action.choices)) if action.choices else ""
            default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default!r}`"
            rows.append([flags, (action.help or "") % vars(action) if action.help else "", choices, default])
        if rows:
            out.append(table(["argument", "meaning", "choices", "default"], rows))
    return "\n".join(out)


def config_page() -> str:
    """Every config key (the same source as ``unmask config``)."""
    rows = [[f"`{k.key}`", k.type, f"`{k.default!r}`", k.help, ", ".join(CHOICES.get(k.key, ()))]
            for k in config_keys()]
    return ("# Config keys\n\nEvery key of a run's config, generated from the dataclasses of `unmask.config` and "
            "the samplers' registered settings (the same list as `unmask config`). Set them in a YAML file or as "
            "`key=value` overrides.\n\n" + table(["key", "type", "default", "meaning", "allowed"], rows))


def samplers_page() -> str:
    """The sampler registry: what each sampler drives and the ``sample.*`` keys it reads."""
    rows = [[f"`{s.name}`", s.decoding, s.summary, ", ".join(f"`{f.name}={f.default!r}`"
                                                         for f in dataclasses.fields(s.settings))]
            for s in SAMPLERS.values()]
    rows += [[f"({WINDOWS})", "diffusion, full-sequence models", "around any diffusion sampler",
              ", ".join(f"`{f.name}={f.default!r}`" for f in dataclasses.fields(WindowSettings))],
             [f"({BLOCKS})", "diffusion, block models", "around any diffusion sampler",
              ", ".join(f"`{f.name}={f.default!r}`" for f in dataclasses.fields(BlockSettings))]]
    return ("# Samplers\n\nGenerated from the sampler registry (`unmask.samplers.registry.SAMPLERS`). Choose one "
            "with `sample.sampler=NAME` (`auto`: the family's default); its keys are `sample.KEY`.\n\n"
            + table(["sampler", "decodes", "what it does", "keys (defaults)"], rows))


def schema_type(schema: dict) -> str:
    """A JSON schema as one line: its types, enum values and bounds."""
    if "anyOf" in schema:
        return " or ".join(schema_type(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"array of {schema_type(schema.get('items', {}))}"
    text = schema.get("type", "any")
    if "enum" in schema:
        text += " (" + ", ".join(map(str, schema["enum"])) + ")"
    bounds = [f"{op} {schema[key]:g}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                      ("exclusiveMaximum", "<")) if key in schema]
    bounds += [f"{key} {schema[key]}" for key in ("minLength", "maxLength", "minItems", "maxItems") if key in schema]
    return text + (" " + ", ".join(bounds) if bounds else "")


def http_page() -> str:
    """The HTTP API of ``unmask serve``: every route and every request schema (from the app's OpenAPI
    schema; the routes are declared without a model, so a placeholder service with the default limits
    stands in for one)."""
    import types

    spec = create_app(types.SimpleNamespace(config=ServeConfig())).openapi()
    out = ["# HTTP API\n", "The routes of `unmask serve` and the JSON bodies they accept, generated from the "
           "application's OpenAPI schema (FastAPI; the server also serves it at `/openapi.json`). Unknown fields "
           "are refused (422); limits beyond the schema's (`--max-tokens`, `--max-n`, `--max-steps`, "
           "`--max-body-bytes`) are the server's flags, see the [command line](cli.md).\n",
           table(["method", "path", "what"], [[m.upper(), f"`{path}`", op.get("description") or op.get("summary", "")]
                                            for path, ops in spec["paths"].items() for m, op in ops.items()])]
    for name, schema in spec["components"]["schemas"].items():
        if "Validation" in name:
            continue
        out.append(f"## {name}\n\n{schema.get('description', '')}\n")
        required = set(schema.get("required", ()))
        rows = [[f"`{field}`", schema_type(prop), "required" if field in required else f"`{prop.get('default')!r}`",
                 prop.get("description", "")] for field, prop in schema.get("properties", {}).items()]
        out.append(table(["field", "type", "default", "meaning"], rows))
    return "\n".join(out)


PACKAGE = Path(unmask.__file__).resolve().parent


def modules_of(package: Path) -> list[str]:
    """The dotted names of a package's modules (``__init__`` first), private ones left out."""
    base = "unmask" + "".join(f".{p}" for p in package.relative_to(PACKAGE).parts)
    names = [base] if package != PACKAGE else []
    return names + [f"{base}.{p.stem}" for p in sorted(package.glob("*.py"))
                    if not p.stem.startswith("_") and p.stem != "__main__"]


def api_page() -> str:
    """The Python API: the top-level names, then every module of every subpackage (autodoc)."""
    out = ["# Python API\n", "Generated from the docstrings when the docs are built: the top-level names "
           "(`import unmask`), then every module.\n", "```{eval-rst}\n.. automodule:: unmask\n   :no-members:\n"]
    # a top-level function named like a subpackage (``unmask.train``) is indexed under its module's name
    out += [f".. auto{'class' if name[0].isupper() else 'function'}:: unmask.{name}"
            + ("\n   :no-index:" if (PACKAGE / name).is_dir() else "")
            for name in unmask.__all__ if name not in ("FAMILIES", "SAMPLERS")]
    out.append("```\n")
    packages = [PACKAGE, *sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))]
    for package in packages:
        title = "unmask" if package == PACKAGE else f"unmask.{package.name}"
        out.append(f"## {title}\n")
        for module in modules_of(package):
            out.append(f"```{{eval-rst}}\n.. automodule:: {module}\n```\n")
    return "\n".join(out)


def write_reference(app) -> None:
    folder = DOCS / "reference"  # every page in it is generated (and ignored by git)
    folder.mkdir(exist_ok=True)
    for name, page in (("cli", cli_page), ("config", config_page), ("samplers", samplers_page), ("api", api_page),
                       ("http", http_page)):
        text = page()
        path = folder / f"{name}.md"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def exists_in_code(target: str, module: str | None, cls: str | None) -> bool:
    """Whether ``target`` names an attribute of unmask's code: dotted from a module, or from the referring
    module or class (constants and private helpers, which the reference does not list)."""
    prefixes = [""] + ([f"{module}.", *([f"{module}.{cls}."] if cls else [])] if module else [])
    for full in (prefix + target for prefix in prefixes):
        parts = full.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:  # a dataclass field without a default is no class attribute
                    obj = getattr(obj, "__dataclass_fields__", {}).get(attr) or getattr(obj, attr)
            except AttributeError:
                break
            if full.startswith("unmask."):
                return True
            break
    return False


def resolve_short_name(app, env, node, contnode):
    """A docstring names an object as its module's code does (``SampleConfig``, ``KVCache.append``): the
    reference links when exactly one documented unmask object has that dotted tail, and is plain text when
    the name exists in the code without an entry of its own (a constant); an unknown name stays unresolved,
    and the nitpicky build fails on it."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    found = [name for name in domain.objects if name == target or name.endswith("." + target)]
    if len(found) != 1:
        return contnode if exists_in_code(target, node.get("py:module"), node.get("py:class")) else None
    name = found[0]
    return domain.resolve_xref(env, node["refdoc"], app.builder, domain.objects[name].objtype, name, node,
                               contnode)


def setup(app):
    app.connect("builder-inited", write_reference)
    app.connect("missing-reference", resolve_short_name)
