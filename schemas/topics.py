"""The default topic names of the Kafka contract, in one place: the stream worker writes these
topics and the retraining job reads them (each is a setting; these are the defaults)."""

AUDIT_TOPIC = "rsafe.audit"
DLQ_TOPIC = "rsafe.dlq"
POLICIES_TOPIC = "rsafe.policies"
"""The policy store: every policy version a worker loaded, key ``name@version`` (compacted)."""
MODELS_TOPIC = "rsafe.models"
"""Which model / adapter version workers serve (compacted; ``rsafe train promote`` writes it)."""
FEEDBACK_TOPIC = "rsafe.feedback"
REPORTS_TOPIC = "rsafe.reports"
DISAGREEMENTS_TOPIC = "rsafe.disagreements"
REVIEW_TOPIC = "rsafe.review"
VERDICTS_SUFFIX = ".verdicts"
