"""Batch pipelines as Prefect flows (features, train, promote, rewards); never imported by serving.

Each flow's steps are plain functions of the domain modules here (``gate``, ``rewards``,
``retrain``, ``materialize``), callable and tested without Prefect; ``flows`` wraps them in
tasks with retries and reports, and ``local`` runs them on a temporary local Prefect API.
"""
