"""`kit bundle NAME`: a run or ensemble as an offline folder, submissions/<name>.bundle/.

    summary = build_bundle(Path("."), "blend", fmt="dacon")

infer.py embeds kit's inference modules (kit/infer and the helpers they import, gzip + base64) and
the recipe; weights/ holds each member's fold weights; manifest.json lists every file with its
sha256 and size; README.txt gives the command and a run-time estimate. Modules: embed (which
sources, import rewriting, the closure check), script (infer.py's text), build (the folder and the
recipe tree), vlm and probe (those members' specs and files), estimate and rates (the run time,
from rates measured at build time), readme, formats (Dacon submit.zip, Kaggle dataset), command (the CLI).
"""
