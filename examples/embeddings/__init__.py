"""A sentence-embedding service: FastAPI in front, Celery and celery-gpu behind, all-MiniLM-L6-v2 on the GPU.

``model`` loads the model and embeds a list of texts; ``worker`` is the Celery app and its tasks; ``bridge``
lets an asyncio server wait for Celery results without blocking its event loop; ``api`` is the FastAPI app;
``loadgen`` drives it over HTTP; ``serve`` starts an embedded Redis, a worker and the API in one command.
See README.md in this folder.
"""
