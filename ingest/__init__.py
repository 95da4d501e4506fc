"""`python -m ingest`: read a catalogue, validate it, embed photos and texts, upsert into Qdrant."""
