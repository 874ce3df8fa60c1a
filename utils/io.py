"""Atomic file and directory writes: models/io.py (one helper for the whole repo), re-exported here."""
from models.io import atomic_dir, atomic_write, commit_dir  # noqa: F401
