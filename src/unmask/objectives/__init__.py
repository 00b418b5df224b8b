"""Training objectives and noise schedules; every objective returns per-sequence sums."""
