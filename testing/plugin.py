"""pytest plugin (placeholder until rankd.testing lands)."""
