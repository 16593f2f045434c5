"""ehr-alerts processing and state: sources, Celery app and tasks, patient timeline and alert store."""
