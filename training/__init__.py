"""The retraining job, what a user of a real model runs: the training set (``dataset``), GRPO with
the RSafe rule reward (``grpo``, ``rewards``), the promotion gate (``promote``), the model registry
(``registry``) and ``rsafe train`` / ``rsafe models`` (``cli``).

The toy demo model, its corpus and its drift scenario live in ``rsafe.demo``, which this package
never imports. Importing it registers nothing.
"""
