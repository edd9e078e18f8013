"""Counters (per region, access kind and path), CPU accounting, exports."""
