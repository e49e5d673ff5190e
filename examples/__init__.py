"""Examples of celery-gpu services (not part of the installed package)."""
