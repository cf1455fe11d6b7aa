"""Development stand-ins: a local CA, token issuer, ID-porten provider, fake Altinn and the demo (``make run``).

Nothing here is imported by the request path; the gateway runs without this package.
"""
