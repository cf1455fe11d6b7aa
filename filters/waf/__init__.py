"""WAF: a SecLang engine running the OWASP CRS or the built-in pack. See issue 5."""
