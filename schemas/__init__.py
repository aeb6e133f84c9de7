"""The Kafka contract, shared by the stream worker and the retraining job.

* ``topics``   default topic names
* ``common``   ``SCHEMA_VERSION``, ``utcnow``, the ``Versioned`` base of every wire record
* ``records``  the worker's records: ``ChatEvent`` in; ``VerdictRecord``, ``AuditRecord``, ``DLQRecord`` out
* ``feedback`` human labels in; disagreements and review items out
* ``models``   the model control record (``rsafe.models``)
* ``jsonl``    the one JSON Lines reader (and appender) of record files and logs
* ``kafka``    small blocking Kafka helpers: read topics to their end, publish and wait, read the
  policy store (``strict`` or not)

``rsafe.stream`` produces these records and ``rsafe.training`` consumes them; both import them from
here, so the two stay in step without the stream importing training code or the reverse. This room
imports ``rsafe.policies`` (the policy store's records) and ``rsafe.models`` (``JudgedBy``, turns).
"""
