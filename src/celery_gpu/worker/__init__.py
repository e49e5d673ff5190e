"""The worker's main process: the Celery pool and what it is made of.

``pool`` (the Celery pool API and life cycle), ``scheduler`` (what runs next and where; memory ledger; flush
policy), ``work`` (a job and a batch), ``process`` (a slot: one device process and its states),
``supervisor`` (spawn, exits and respawn backoff, quarantine, recycling, time limits, heartbeat watchdog),
``outcomes`` (what Celery is told, once; re-runs and the dead letter), ``snapshot`` (the status as data),
``loop`` (where pipes are read), ``admission`` (learned memory), ``deadletter`` (the dead-letter queue) and
``consumer/`` (Celery consumer internals: strategy, acks, prefetch, bulk receive).

It never imports torch or CuPy, and never the device package (``celery_gpu.device``).
"""
