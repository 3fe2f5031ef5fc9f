"""Observability: metrics, the dashboard, usage accounting, logs. Reads snapshots; never
drives a request."""
