"""Record schemas shared by the stream worker and the retraining job (no Kafka, no torch).

The one place both ``rsafe.stream`` (which produces these records) and ``rsafe.training`` (which
consumes them) import, so the two stay in step without the stream importing training code.
"""
