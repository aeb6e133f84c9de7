"""The toy demo model and everything that only exists for it (issue 31): the synthetic corpus
(``corpus``, its data in ``data/demo_corpus.yaml``), its tokenizer, SFT and policy-lookup pairs
(``tokenizer``, ``sft``, ``lookup``), the build and its check (``build``; the committed build is
``demo/model/``, data, not a module), the drift scenario (``drift``), the demo evaluation sets
(``benchmarks``) and the commands that use them (``cli``).

This room may import every other room (policies, schemas, models, stream, evaluation, training);
only the ``rsafe`` command (``rsafe.cli``) and the loop demo (``rsafe.loop``) import it. Importing it
registers nothing: the command calls ``register_demo_benchmarks`` and hands ``rsafe train`` the
demo's part (``rsafe.demo.cli``).
"""
