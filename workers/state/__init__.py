"""The Redis state: patient timelines, the alert store, the review index, their key layout and Lua scripts.

Everything that reads or writes Redis keys (other than Celery's own) lives here; ``workers.pipeline`` and the
service use it through :class:`~workers.state.store.Store` and :class:`~workers.state.review_index.ReviewIndex`.
"""
