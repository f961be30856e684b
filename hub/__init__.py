"""modelfleet hub."""
