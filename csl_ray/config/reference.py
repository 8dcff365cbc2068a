"""The configuration reference (every key, its default and meaning), generated from the schema's docstrings:
the README's table (`python -m csl_ray.config`) and the `--help` epilog of the jobs/ scripts."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from csl_ray.config.schema import Config, field_types


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key: the README's configuration reference."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    rows = []
    default = cls()
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(getattr(default, name)), docs.get(name, "")))
    return rows


def reference_markdown() -> str:
    """The configuration reference table of the README, generated so it cannot drift from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in field_docs():
        lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def reference_text(width: int = 100) -> str:
    """Every key with its default and meaning as plain text: the `--help` epilog of the jobs/ scripts."""
    lines = []
    for key, default, doc in field_docs():
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
