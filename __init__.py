"""RSafe stream guard: reasoning-based LLM content moderation.

Layout (one import package, data flows one way):
``rsafe.policies`` → ``rsafe.models`` → ``rsafe.stream`` / ``rsafe.training`` /
``rsafe.evaluation`` → ``rsafe.demo`` (the toy demo model) → ``rsafe.cli``.
"""

__version__ = "0.1.0"
