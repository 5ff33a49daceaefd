"""`kit demo`: the whole pipeline on real photos that install from PyPI (see kit.demo.pipeline)."""
