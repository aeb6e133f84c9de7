"""Everything that trains: the demo corpus, tokenizer and SFT, the demo model build, GRPO, registry.

Importing this package registers the synthetic demo evaluation sets with ``rsafe.evaluation``
(``rsafe.training.benchmarks``).
"""

from rsafe.training import benchmarks as _benchmarks  # noqa: F401 - registers the demo sets
