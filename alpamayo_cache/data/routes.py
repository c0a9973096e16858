"""Navigation routes per clip, for the models that read one (Alpamayo 1.5; 2 Super's nav demo).

PhysicalAI-AV has no route field today, so routes come from a file the user writes, one text per clip:

- JSON: ``{"<clip_id>": "Turn left in 11m", ...}``;
- CSV: a header ``clip_id,route`` then one row per clip (quote texts that hold commas).

A clip the file does not list (or lists with an empty text) has no route: its samples are made without
one (unguided) and say so in their provenance. ``synthetic`` means the routes the built-in synthetic
dataset writes beside its clips (``metadata/routes.json``), derived from each clip's scenario.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from alpamayo_cache.errors import UserError

SYNTHETIC_ROUTES = "metadata/routes.json"
MAX_ROUTE_CHARS = 500  # a navigation instruction, not a document


def read_routes(path: Path) -> dict[str, str]:
    """clip_id -> route text from a JSON map or a ``clip_id,route`` CSV; empty texts are dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"route file {path} does not exist: pass a JSON map or CSV of clip_id -> route text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"route file {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and not {"clip_id", "route"} <= set(rows[0]):
            raise UserError(f"route file {path} needs a header 'clip_id,route'")
        routes = {row["clip_id"]: row["route"] or "" for row in rows}
    else:
        try:
            routes = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"route file {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(routes, dict) or not all(isinstance(v, str) for v in routes.values()):
            raise UserError(f"route file {path} must be a JSON object mapping clip ids to route texts")
    for clip, route in routes.items():
        if len(route) > MAX_ROUTE_CHARS or "<|" in route:
            raise UserError(
                f"route of clip {clip[:80]} in {path} is not a plain instruction (over {MAX_ROUTE_CHARS} "
                "characters, or holds a special token)"
            )
    return {clip: route.strip() for clip, route in routes.items() if route.strip()}


def routes_digest(routes: dict[str, str]) -> str:
    """A short hash of the routes (part of the store fingerprint: other routes, other features)."""
    payload = json.dumps(sorted(routes.items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def scenario_route(scenario: str, turn_in_m: float) -> str:
    """The synthetic clips' route: the turn they are about to take (metres to its start)."""
    if scenario == "straight":
        return "Continue straight"
    return f"Turn {scenario} in {max(1, round(turn_in_m))}m"
