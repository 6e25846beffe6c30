"""Sweeps: Ray Tune + OptunaSearch + ASHA over the engine's training function.

The package, in the order a sweep uses it:

* ``space``             the search-space file -> validated parameters, Optuna distributions, the config's own
                        values as the first point, each trial's config
* ``asha``              ASHA's settings (one type from the space file to the report), its rungs, and the
                        record of the trials it stopped (no Ray)
* ``record``            ``SweepRecord``: sweep.json, typed and versioned (no Ray)
* ``sweep``             ``run_sweep``: the Tuner, the searcher, the scheduler, the console table, the end
* ``trainable``         one trial: the training loop inside the trial, or a TorchTrainer per trial
* ``placement_groups``  a multi-worker trial's Train placement groups, recorded and released
* ``study``             the Optuna study kept for optuna-dashboard, live and after the sweep
* ``sweep_tracking``    Tune's MLflow / W&B logger callbacks and the sweep's own tracker run
* ``warm_start``        a previous sweep's best configurations, run first (no Ray)
* ``results``           the trial table: rows, the best trial, CSV and Markdown (no Ray)
* ``best_config``       the best trial as a training config (no Ray)
* ``rung_trust``        whether ASHA's rungs forecast the final ranking, from the sweep's own trials (no Ray)
* ``report``            ``neoray report``: Markdown and plots from what a sweep left on disk (no Ray)

The search-quality benchmark's replay lives in ``benchmarks/search_replay.py``: the product never imports it.
"""
