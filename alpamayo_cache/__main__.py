"""``python -m alpamayo_cache`` runs the CLI."""

from alpamayo_cache.cli import app

app(prog_name="alpamayo-cache")
