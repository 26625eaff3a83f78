"""Retrieval: the metric engine, validation scores, the visual report, the results table, and
photo-folder search (index, CLI, app)."""
