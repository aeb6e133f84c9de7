"""The worker's exit statuses (``rsafe serve``), in one place: what an orchestrator reads."""

EXIT_OK = 0
EXIT_FAILED = 1
"""It could not start (bad config, unreachable broker, unsupported library version ...)."""
EXIT_CRASHED = 3
"""The Faust app crashed (an error no guard caught); the event that crashed it stays uncommitted."""
EXIT_ENGINE_DEAD = 4
"""The engine could not judge anything (failed health probe, or too many failed batches)."""
EXIT_FENCED = 5
"""Another member joined the group with this worker's ``group_instance_id`` (``membership``)."""
