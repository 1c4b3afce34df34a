"""Holds migration_files/ (goose format) like the upstream image; no server here."""
