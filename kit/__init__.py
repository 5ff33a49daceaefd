"""kit: a competition kit for image classification contests.

Stages (each a CLI command over a pure function, see README.md):
folds -> train -> ensemble -> submit -> bundle.
"""

__version__ = "0.1.0"
