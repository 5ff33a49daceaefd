"""The kit sources a bundle embeds, under a private package name so the bundle never imports `kit`.

`modules(needs)` lists kit/infer and the import-light helpers it uses; `rewrite` points their
`kit.` imports at the private package; `check_closure` refuses a module whose top-level imports
reach beyond the standard library, the allowed third-party packages and the other embedded modules
(a heavy import slipped into a helper would otherwise only fail on the competition's machine).

    sources = embedded_sources({"ensemble"}, package="_kit_bundle_ab12")   # {"infer/cli.py": "..."}
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import kit
from kit.errors import KitError

KIT_DIR = Path(kit.__file__).resolve().parent
CORE = [
    "errors.py",
    "io.py",
    "metrics.py",
    "preds.py",
    "images.py",
    "preprocess.py",
    "train/runtime.py",
    "infer/__init__.py",
    "infer/cli.py",
    "infer/cudnn_warmup.py",
    "infer/graphed_forward.py",
    "infer/images.py",
    "infer/manifest.py",
    "infer/pillow_resize.py",
    "infer/predict.py",
    "infer/probe_predict.py",
    "infer/progress.py",
    "infer/streams.py",
    "infer/submission.py",
    "infer/testset.py",
    "infer/timm_predict.py",
]
EXTRA = {
    "ensemble": ["ensemble/apply.py", "ensemble/fusion_models.py"],
    "vlm": ["infer/vlm_predict.py", "config.py", "vlm/model.py", "vlm/inputs.py", "vlm/features.py"],
}
# a function-level import of an extra's module is reached only when a member needs that extra, and
# then the extra is embedded
OPTIONAL = [rel for rels in EXTRA.values() for rel in rels]
# third-party packages an embedded module may import at its top level (yaml: kit.config, VLM members
# only; it comes with timm and transformers); function-level imports (transformers, peft, tqdm) load
# only when used
TOP_LEVEL_ALLOWED = {"numpy", "torch", "PIL", "timm", "safetensors", "yaml"}
# function-level kit imports of embedded files that the bundle never reaches (checked by the tests)
UNREACHED = {("preds.py", "kit.folds")}
_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)kit(?=[.\s])", re.MULTILINE)


def modules(needs: set[str]) -> list[str]:
    """Paths relative to the kit package of every module a bundle with these extras embeds."""
    unknown = needs - set(EXTRA)
    if unknown:
        raise ValueError(f"unknown bundle extras {sorted(unknown)}")
    return CORE + [m for need in sorted(needs) for m in EXTRA[need]]


def module_name(rel: str, package: str = "kit") -> str:
    parts = Path(rel).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def rewrite(source: str, package: str) -> str:
    """`from kit.x import y` -> `from <package>.x import y` (and `import kit.x`), nothing else."""
    return _IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{package}", source)


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, at top level) of every absolute import in a module."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
    return found


def check_closure(rels: list[str], root: Path = KIT_DIR) -> None:
    """Raise KitError if an embedded module imports what the bundle cannot provide."""
    names = {module_name(rel) for rel in rels}
    packages = {name.rsplit(".", i)[0] for name in names for i in range(name.count(".") + 1)}
    for rel in rels:
        source = (root / rel).read_text(encoding="utf-8")
        for module, top in _imports(ast.parse(source)):
            first = module.split(".")[0]
            if first == "kit":
                if module in names or module in packages or (rel, module) in UNREACHED:
                    continue
                if not top and module in {module_name(r) for r in OPTIONAL}:
                    continue
                raise KitError(f"kit/{rel}: imports {module}, which the bundle does not embed")
            if top and first not in sys.stdlib_module_names | TOP_LEVEL_ALLOWED | {"__future__"}:
                allowed = ", ".join(sorted(TOP_LEVEL_ALLOWED))
                raise KitError(f"kit/{rel}: imports {module} at its top level; a bundle may need only {allowed}")


def init_files(rels: list[str]) -> list[str]:
    """Empty __init__.py for every package on the way that kit's own __init__ is not embedded for."""
    dirs = {Path(rel).parent for rel in rels}
    dirs |= {parent for d in dirs for parent in d.parents}
    return sorted((d / "__init__.py").as_posix() for d in dirs if (d / "__init__.py").as_posix() not in rels)


def embedded_sources(needs: set[str], package: str, root: Path = KIT_DIR) -> dict[str, str]:
    """Relative path -> rewritten source text of every file of the private package."""
    rels = modules(needs)
    check_closure(rels, root)
    sources = dict.fromkeys(init_files(rels), '"""Package of an offline kit bundle."""\n')
    for rel in rels:
        text = rewrite((root / rel).read_text(encoding="utf-8"), package)
        leftover = [m for m, _ in _imports(ast.parse(text)) if m.split(".")[0] == "kit"]
        if leftover:
            raise KitError(f"kit/{rel}: import of {leftover[0]} left after rewriting")
        sources[rel] = text
    return sources
