"""Matching above search: the match model (`model`: features, fit, decisions, `find_matches`) and a
retailer's matches in bulk (`batch`: rows, resume)."""
