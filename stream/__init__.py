"""The streaming worker: Faust agents from Kafka chat events to verdict, audit and DLQ topics.

Modules, in data-flow order: ``config`` (settings) → ``records`` (wire schemas) → ``moderate``
(a batch → records; no Kafka) → ``pipeline`` (in-flight window, ordered publish, acks) → ``app``
(Faust wiring) → ``worker`` (start/stop, signals, hot reload via ``policy_watch``). ``broker`` is
the embedded development broker and topic admin; ``cli`` adds ``rsafe broker|worker|produce|tail|demo``.
See docs/STREAM.md. Importing this package does not import Faust, vLLM or torch.
"""
