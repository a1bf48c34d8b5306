"""Providers: where instances come from (local processes, AWS EC2, in-memory for tests)."""
