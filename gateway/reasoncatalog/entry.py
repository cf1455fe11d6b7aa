"""One catalogue entry: (who acts, meaning en, meaning no, action en, action no); internal entries
start with the public reason the client sees. ``who``: integrator (the caller), operator (who runs
Portvakt), both."""

Entry = tuple[str, str, str, str, str]
