"""`kit tune`: an Optuna search over the training recipe (kit.tune.search.run_tune is the one call)."""
