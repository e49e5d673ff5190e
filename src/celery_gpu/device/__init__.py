"""The device process: everything that runs inside one of the pool's spawned, device-pinned processes.

``main`` (the entry, ``python -m celery_gpu.device``), ``tracing`` (one task through Celery's tracer), ``batch``
(a batch: decode, call, trace each item), ``split`` (the call with bisection), ``results`` (a batch's result
writes in one round trip), ``recovery`` and ``classify`` (what a failure on the device is and what to do about
it), ``memory`` (device memory as this process sees it), ``faults`` (fault injection on fake devices),
``staging`` (host → device copies), ``context`` (this process's state, in one object).

It never imports the worker package (``celery_gpu.worker``), and the worker never imports it.
"""
