"""Operations support shared by the API and the workers: structured logs without PHI, correlation ids,
Redis-backed pipeline metrics, worker heartbeats and Celery hooks."""
