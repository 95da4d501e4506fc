"""Pydantic contracts shared by ingest, retrieval and the service (no torch, qdrant or app code)."""
