"""Real local agents for integration tests (filled in below)."""
