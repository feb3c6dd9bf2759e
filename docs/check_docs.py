"""Checks README.md and docs/*.md against the tree and the current API. Run from the repository root:

    python docs/check_docs.py

* every relative link resolves: the file exists and, for ``#anchor``, a heading of that file has that GitHub slug;
* every ``python`` block parses, its ``lightning_accel`` imports resolve, and every call of a ``lightning_accel``
  name binds its arguments (``inspect.signature(...).bind_partial``);
* every ``yaml`` block's ``lightning_accel.X`` callbacks take the ``init_args`` keys given.

Exit status 1 with one line per problem, else 0.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re
import sys

import yaml

FENCE = re.compile(r"```.*?```", flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", path.read_text()), flags=re.M)}


def check_links(md: pathlib.Path) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", md.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, frag = target.partition("#")
        dest = (md.parent / file).resolve() if file else md.resolve()
        if not dest.exists():
            problems.append(f"{md}: link to a missing file: {target}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            problems.append(f"{md}: link to a missing heading: {target}")
    return problems


def _binds(obj: object, node: ast.Call) -> str | None:
    try:
        inspect.signature(obj).bind_partial(*[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
    except TypeError as err:
        return str(err)
    except ValueError:  # no signature (a builtin)
        return None
    return None


def check_python(md: pathlib.Path, body: str) -> list[str]:
    import lightning_accel

    try:
        tree = ast.parse(body.replace("\n    ...\n", "\n    pass\n"))
    except SyntaxError as err:
        return [f"{md}: a python block does not parse: {err}"]
    problems, names = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning_accel":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
                else:
                    problems.append(f"{md}: cannot import {alias.name} from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, obj, label = node.func, None, ""
        if isinstance(func, ast.Name) and func.id in names:
            obj, label = names[func.id], func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "lightning_accel":
            if not hasattr(lightning_accel, func.attr):
                problems.append(f"{md}: lightning_accel has no {func.attr}")
                continue
            obj, label = getattr(lightning_accel, func.attr), f"lightning_accel.{func.attr}"
        if obj is not None and callable(obj) and (err := _binds(obj, node)):
            problems.append(f"{md}: {label}(...) does not bind: {err}")
    return problems


def check_yaml(md: pathlib.Path, body: str) -> list[str]:
    try:
        doc = yaml.safe_load(body) or {}
    except yaml.YAMLError as err:
        return [f"{md}: a yaml block does not parse: {err}"]
    problems = []
    callbacks = ((doc.get("trainer") or {}).get("callbacks") or []) if isinstance(doc, dict) else []
    for cb in callbacks:
        class_path = cb.get("class_path", "")
        if not class_path.startswith("lightning_accel."):
            continue
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if cls is None:
            problems.append(f"{md}: no class {class_path}")
            continue
        params = inspect.signature(cls).parameters
        problems += [f"{md}: {class_path} has no argument {k!r}" for k in (cb.get("init_args") or {}) if k not in params]
    return problems


def main(root: pathlib.Path) -> int:
    problems: list[str] = []
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for md in pages:
        problems += check_links(md)
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", md.read_text(), flags=re.S):
            if lang == "python":
                problems += check_python(md, body)
            elif lang == "yaml":
                problems += check_yaml(md, body)
    print("\n".join(problems) if problems else f"{len(pages)} pages: links, python and yaml blocks all check")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(".")))
