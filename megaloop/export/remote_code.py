"""The modeling files of an export, made from megaloop's own source, so that they cannot drift
from the model that trained.

`modeling_megaloop.py` is config.py's ModelConfig, then model/blocks.py, hyper.py, loops.py,
early_exit.py, looped.py and export/hf_modeling.py, one after another, each without its
docstring and its megaloop imports; their other imports are gathered at the top (only those a
kept line uses), and ConfigError becomes a ValueError of the file's own.
`configuration_megaloop.py` is export/hf_configuration.py as it is. Both import only the
standard library, torch and transformers (flash-attn where installed), which
`check_standalone` verifies.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass

from megaloop.version import describe

# (module, the top-level names it gives; None: all of them), in the order they are written
MODELING_PARTS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("megaloop.config", ("ModelConfig",)),
    ("megaloop.model.blocks", None),
    ("megaloop.model.hyper", None),
    ("megaloop.model.loops", None),
    ("megaloop.model.early_exit", None),
    ("megaloop.model.looped", None),
    ("megaloop.export.hf_modeling", None),
)
CONFIGURATION_MODULE = "megaloop.export.hf_configuration"
CONFIGURATION_FILE = "configuration_megaloop.py"
MODELING_FILE = "modeling_megaloop.py"
ALLOWED_IMPORTS = {"torch", "transformers", "flash_attn", "__future__", "math", "contextlib",
                   "functools",
                   "dataclasses", "typing", "collections"}
HEADER = '''"""The megaloop model{what} for transformers, written by `megaloop export-hf`
({version}).

Generated from megaloop's source (megaloop/export/remote_code.py): the model here is the one that
trained, line for line. It imports only torch and transformers. Edit megaloop, not this file.
"""
'''
ERRORS = '''

class ConfigError(ValueError):
    """A model setting or input this model cannot run."""
'''


@dataclass
class _Part:
    imports: list[ast.stmt]
    code: list[tuple[ast.stmt, str]]  # each kept statement with its source lines


def _module_source(name: str) -> str:
    """The source of module `name`, read without running it (hf_modeling imports transformers,
    which an exporting machine may lack until the export says so)."""
    spec = importlib.util.find_spec(name)
    with open(spec.origin, encoding="utf-8") as file:
        return file.read()


def _split(name: str, wanted: tuple[str, ...] | None) -> _Part:
    """The imports and the statements (with the comments above them) of module `name`."""
    source = _module_source(name)
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    part, previous_end = _Part([], []), 0
    for index, node in enumerate(tree.body):
        text = "".join(lines[previous_end:node.end_lineno])
        previous_end = node.end_lineno
        docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(
            getattr(node, "value", None), ast.Constant)
        if docstring:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            part.imports.append(node)
            continue
        if wanted is not None and not (set(_defined_names(node)) & set(wanted)):
            continue
        part.code.append((node, text))
    return part


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _used_names(nodes: list[ast.stmt]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.value.id for node in nodes for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _imports(parts: list[_Part], used: set[str]) -> list[str]:
    """The non-megaloop imports of `parts` that bind a name in `used`, merged by module."""
    plain: set[str] = set()
    from_module: dict[str, set[str]] = {}
    for node in (node for part in parts for node in part.imports):
        if isinstance(node, ast.ImportFrom):
            if node.level or node.module in (None, "__future__") or \
                    node.module.startswith("megaloop"):
                continue
            for alias in node.names:
                if (alias.asname or alias.name) in used:
                    from_module.setdefault(node.module, set()).add(
                        alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
        else:
            for alias in node.names:
                if not alias.name.startswith("megaloop") and \
                        (alias.asname or alias.name.split(".")[0]) in used:
                    plain.add(f"import {alias.name}"
                              + (f" as {alias.asname}" if alias.asname else ""))
    lines = [f"from {module} import {', '.join(sorted(names))}"
             for module, names in from_module.items()]
    return sorted(plain | set(lines), key=_import_order)


def modeling_source() -> str:
    """The text of modeling_megaloop.py."""
    parts = [_split(name, wanted) for name, wanted in MODELING_PARTS]
    kept = [node for part in parts for node, _ in part.code]
    used = _used_names(kept)
    imports = _imports(parts, used)
    defined: dict[str, str] = {}
    for (name, _), part in zip(MODELING_PARTS, parts, strict=True):
        for node, _ in part.code:
            for symbol in _defined_names(node):
                if symbol in defined:
                    raise RuntimeError(f"{symbol} is defined in both {defined[symbol]} and "
                                       f"{name}: rename one, they share modeling_megaloop.py")
                defined[symbol] = name
    _check_megaloop_imports(parts, set(defined) | {"ConfigError", "MegaloopConfig"})
    body = []
    for (name, _), part in zip(MODELING_PARTS, parts, strict=True):
        body.append(f"\n\n# ---- from {name} " + "-" * max(0, 80 - len(name) - 13) + "\n")
        body += [text.rstrip("\n").lstrip("\n") + "\n\n\n" for _, text in part.code]
    relative = f"from .{CONFIGURATION_FILE[:-3]} import MegaloopConfig\n"
    source = (HEADER.format(what="", version=describe()) + "\nfrom __future__ import "
              "annotations\n\n" + "\n".join(imports) + "\n\n" + relative
              + ERRORS + "".join(body).rstrip("\n") + "\n")
    compile(source, MODELING_FILE, "exec")  # a SyntaxError here is megaloop's bug, not the user's
    return source


def _check_megaloop_imports(parts: list[_Part], defined: set[str]) -> None:
    """Every name a part imports from megaloop must be defined in the joined file: a dropped
    import of anything else would fail only when its line runs, on a user's machine."""
    for node in (node for part in parts for node in part.imports):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megaloop"):
            missing = [a.name for a in node.names if (a.asname or a.name) not in defined]
            if missing:
                raise RuntimeError(f"modeling_megaloop.py would lack {', '.join(missing)} "
                                   f"(from {node.module}): add its module to MODELING_PARTS")


def _import_order(line: str) -> tuple[int, str, str]:
    """The standard library first, then torch and transformers; `import` before `from`."""
    module = line.split()[1]
    third_party = module.split(".")[0] in ("torch", "transformers", "flash_attn")
    return (int(third_party), module, line)


def configuration_source() -> str:
    """The text of configuration_megaloop.py."""
    source = _module_source(CONFIGURATION_MODULE)
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    after_docstring = tree.body[0].end_lineno if isinstance(tree.body[0], ast.Expr) else 0
    return (HEADER.format(what="'s config", version=describe())
            + "".join(lines[after_docstring:]))


def check_standalone(source: str, what: str) -> None:
    """Refuse a generated file that imports anything beyond ALLOWED_IMPORTS."""
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        for name in names:
            if name.split(".")[0] not in ALLOWED_IMPORTS:
                raise RuntimeError(f"{what} would import {name}: the exported model must need "
                                   "only torch and transformers")
