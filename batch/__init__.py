"""modelfleet batch."""
