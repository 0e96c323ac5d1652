"""Fetching inputs: options and shared helpers, one session (lookup order, verification), one
HTTP download. The entry points are in builder.fetch."""
