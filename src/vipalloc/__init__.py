"""vipalloc."""
