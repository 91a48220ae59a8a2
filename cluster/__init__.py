"""Cluster side of ipr-dist: Ray initialisation, job entry points, and (later) `ray up` cluster YAMLs."""
