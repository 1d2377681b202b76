"""Where a run meets Ray: connecting to or starting a Ray, its capacity, its logs, the local Ray
`raydist ray start` keeps, the private Ray APIs (ray_compat), interrupts and injected faults."""
