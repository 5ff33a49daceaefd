"""Stage 2: fold training. `kit.train.driver.train_run(cfg, root)` trains every fold of a run and
writes runs/<run>/ as DESIGN.md describes; the model families plug in through `kit.train.families`."""
