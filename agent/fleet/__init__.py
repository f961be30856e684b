"""The agent's fleet side: pull signed bundles from the hub and verify them before loading."""
