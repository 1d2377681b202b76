"""`tp`: tensor parallelism with torch's DTensor on Ray Train workers (the strategy comes next)."""
