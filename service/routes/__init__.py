"""One router per resource; handlers parse, call the engine, and return response models."""
