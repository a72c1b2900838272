"""Authentication: argon2 password hashes, hashed bearer tokens with roles, per-user rate limits."""
