"""`product-match COMMAND ...`: every command of the project under one name (the `python -m` forms stay)."""
