"""Adaptation heads: `heads` (apply, store as versions, switch, roll back, rewrite the adapted twins),
`train` (fit heads on cached vectors), `data` (the vectors and labels a catalogue gives to train on).
Below search: a search applies the catalogue's active heads to its query vectors."""
