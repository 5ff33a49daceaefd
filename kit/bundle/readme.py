"""README.txt of a bundle, and the member lines infer.py's docstring shows.

text = readme_text(bundle, ["torch", "timm", ...], estimate_lines)
"""

from __future__ import annotations


def _score(node: dict) -> str:
    cv = node.get("cv_log_loss")
    return f", CV log loss {cv:.5f}" if isinstance(cv, int | float) else ""


def _run_line(node: dict) -> str:
    spec = node["spec"]
    folds = len(node["folds"])
    if spec["family"] == "timm":
        what = f"timm {spec['model']} @ {spec['img_size']} px, TTA {'+'.join(spec['tta'])}"
    elif spec["family"] == "probe":
        what = f"probe: frozen timm {spec['model']} @ {spec['img_size']} px + logistic regression"
    else:
        what = f"vlm {spec['base_name']} + LoRA adapter and head ({spec['vlm']['pooling']} pooling), no TTA"
    return f"{node['key']}: {what}, {folds} folds{_score(node)}"


def member_lines(node: dict, depth: int = 0) -> list[str]:
    pad = "  " * depth
    if node["kind"] == "run":
        return [f"{pad}- {_run_line(node)}"]
    recipe = node["recipe"]
    lines = [f"{pad}- {node['key']}: {recipe['method']} of {len(node['members'])} members{_score(node)}"]
    for member in node["members"]:
        lines += member_lines(member, depth + 1)
    return lines


def readme_text(bundle: dict, requirements: list[str], estimate_lines: list[str]) -> str:
    base = " --base-model DIR" if bundle.get("base_models") else ""
    lines = [
        f"kit bundle of {bundle['kind']} {bundle['name']!r} (kit {bundle['kit']}, built {bundle['created']})",
        "",
        "Run it (no kit, no network; Python with " + ", ".join(requirements) + "):",
        "",
        f"    python infer.py --images TEST_DIR --out submission.csv{base} [--device cpu|cuda] [--batch-size N]",
        "",
        "    --weights DIR     the weights/ folder, when it is not next to infer.py",
        "    --workers N       image-decoding processes (default: cores, at most 16)",
        "    --verify          only check the weights against the manifest",
    ]
    if bundle.get("base_models"):
        lines += ["    --base-model DIR  the VLM's base model folder (MEMBER=DIR for several); trained on:"]
        lines += [f"                      {member}: {path}" for member, path in bundle["base_models"].items()]
    lines += [
        "",
        "What it predicts:",
        *member_lines(bundle["root"]),
        f"{len(bundle['classes'])} classes, {len(bundle['test']['ids'])} test ids in the sample submission's order.",
        "",
        "Estimated run time of one run, part by part, from rates measured where the bundle was built",
        "(start-up and imports, the weights check, model builds, decoding beside the model passes",
        "(images/s x test images x TTA x folds), VLM members, the CSV):",
        *[f"    {line}" for line in estimate_lines],
        "",
        "Images: TEST_DIR is searched recursively and each stored test id is matched to its file (by its",
        "path, file name or stem). With the whole test folder the CSV has the sample submission's rows",
        "in its order; images it does not name are predicted too and appended (a note says so). A folder",
        "holding none of the stored ids is predicted as a new test set (ids from the file names); one",
        "holding only some of them is refused.",
        "",
        "Built with " + ", ".join(f"{k} {v}" for k, v in bundle.get("built_with", {}).items()) + ";",
        "other versions usually work (a timm that names a model's layers differently is refused by name).",
        "",
        "Files: infer.py (kit's inference modules embedded, gzip + base64, and the recipe), weights/",
        "(safetensors, checked against the sha256 and size recorded in infer.py before anything is loaded:",
        "a missing or altered file is one error line and exit code 2), manifest.json (every file with its",
        "sha256 and size), this README.txt.",
        "",
    ]
    return "\n".join(lines)
