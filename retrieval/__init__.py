"""The shared engine: settings, encoders, the Qdrant collection layout and query building."""
