"""Agreement between the cached reasoning text and a trajectory's behaviour, and danger detection.

The text is searched (case-insensitive) for intentions; each intention found has a check in [0, 1] on
the trajectory's behaviour, and the reward is the mean over the intentions found (0.5, neutral, when
the text names none). A phrase up to three words after a negation ("not", "no", "don't", "without",
"avoid", ...) in the same clause does not count. Behaviour comes from the controls (Candidates): heading change h (rad,
left positive) = sum kappa * (v dt + a dt^2 / 2), speed at t0 v0 and at the end vT (m/s), lateral
offset yT (m, left positive) of the last waypoint, XY distance travelled d (m).

| intention            | example phrases                                  | check                            |
| turn left / right    | turn left, left turn, bear/veer/steer left      | clip(+-h / 0.5 rad, 0, 1)         |
| lane change l / r    | change lanes to the left, merge/nudge/shift left | clip(+-yT / 2.5 m, 0, 1)          |
| straight / keep lane | go straight, straight ahead, keep/stay in lane  | clip(1 - abs(h) / 0.5 rad, 0, 1)  |
| stop                 | stop, stopping, come to a stop, halt            | clip(1 - vT / 2 m/s, 0, 1)        |
| wait                 | wait, remain/stay stopped, hold position         | clip(1 - d / 5 m, 0, 1)           |
| slow down            | slow down, decelerate, brake, yield, give way    | max of clip((v0 - vT) / 2 m/s) and the stop check |
| accelerate           | accelerate, speed up, pick up speed              | clip((vT - v0) / 2 m/s, 0, 1)     |

Limits: keywords, not language understanding; "keep lane" on a curved road is scored as "straight".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from alpamayo_cache.rewards.base import Candidates, RewardContext, reward

TURN_RAD = 0.5  # heading change (rad, ~29 deg) that fully satisfies "turn"
LANE_SHIFT_M = 2.5  # lateral offset that fully satisfies "change lanes" (lanes are ~3.5 m wide)
SPEED_DELTA = 2.0  # m/s: speed change that fully satisfies slow down / accelerate; "stopped" below it
WAIT_DISTANCE_M = 5.0  # travelling this far or more contradicts "wait"
NEUTRAL = 0.5

_SIDE = r"(?:to\s+the\s+)?"
_NOT_A_HALT = r"(?!\s+(?:signs?|lines?|lights?|bars?|and\s+go)\b)"
INTENTIONS: dict[str, tuple[str, ...]] = {
    "turn_left": (
        r"\bturn(?:s|ing)?\s+" + _SIDE + r"left",
        r"\bleft\s+turn",
        r"\b(?:bear|veer|steer)(?:s|ing)?\s+left",
    ),
    "turn_right": (
        r"\bturn(?:s|ing)?\s+" + _SIDE + r"right",
        r"\bright\s+turn",
        r"\b(?:bear|veer|steer)(?:s|ing)?\s+right",
    ),
    "lane_left": (
        r"\bchang(?:e|es|ing)\s+(?:lanes?\s+)?" + _SIDE + r"left",
        r"\blane\s+change\s+" + _SIDE + r"left",
        r"\b(?:merg|nudg|shift)(?:e|es|ing)?\s+" + _SIDE + r"left",
    ),
    "lane_right": (
        r"\bchang(?:e|es|ing)\s+(?:lanes?\s+)?" + _SIDE + r"right",
        r"\blane\s+change\s+" + _SIDE + r"right",
        r"\b(?:merg|nudg|shift)(?:e|es|ing)?\s+" + _SIDE + r"right",
    ),
    "straight": (
        r"\b(?:go|goes|going|drive|drives|driving|continue|continues|continuing|proceed|proceeds|proceeding|"
        r"keep|keeps|keeping|head|heads|heading)\s+straight",
        r"\bstraight\s+ahead",
        r"\b(?:keep|keeps|keeping|stay|stays|staying|remain|remains|remaining)\s+(?:in\s+)?(?:the\s+|its\s+|my\s+|our\s+)?"
        r"(?:current\s+)?lane",
        r"\blane[-\s]keeping",
        r"\bfollow(?:s|ing)?\s+the\s+lane",
    ),
    "stop": (
        r"(?<!bus\s)\bstop(?:s|ping)?\b" + _NOT_A_HALT,
        r"\bcome\s+to\s+a\s+(?:full\s+|complete\s+)?stop",
        r"\bhalt",
    ),
    "wait": (
        r"\bwait(?:s|ing)?\b",
        r"\b(?:remain|remains|stay|stays)\s+stopped",
        r"\bhold(?:s|ing)?\s+(?:its\s+|my\s+)?(?:position|still)",
    ),
    "slow": (
        r"\bslow(?:s|ing)?\s+down",
        r"\bslower\b",
        r"\bslowing\b",
        r"\bdecelerat",
        r"\bbrak(?:e|es|ing)\b",
        r"\byield",
        r"\bgive(?:s)?\s+way",
        r"\breduc(?:e|es|ing)\s+(?:the\s+|its\s+)?speed",
    ),
    "accelerate": (r"\baccelerat", r"\bspeed(?:s|ing)?\s+up", r"\bpick(?:s|ing)?\s+up\s+speed"),
}
_NEGATION = re.compile(
    r"\b(?:not|no|never|without|avoid|avoids|avoiding|don't|doesn't|dont|cannot|can't|won't|nor)\b"
    r"(?:\W+\w+){0,2}\W*$"
)
_COMPILED = {name: [re.compile(p, re.IGNORECASE) for p in pats] for name, pats in INTENTIONS.items()}


def _affirmed(pattern: re.Pattern[str], text: str) -> bool:
    """Whether pattern occurs in text at least once without a negation just before it."""
    for match in pattern.finditer(text):
        # Only the same clause: "don't turn left; keep straight" affirms keeping straight.
        before = re.split(r"[.;:!?,]", text[max(0, match.start() - 40) : match.start()])[-1]
        if not _NEGATION.search(before.lower()):
            return True
    return False


def intentions(text: str) -> list[str]:
    """Names of the intentions the text states (see INTENTIONS), in table order."""
    return [name for name, pats in _COMPILED.items() if any(_affirmed(p, text) for p in pats)]


def names_danger(text: str, keywords: Iterable[str]) -> bool:
    """Whether text names a hazard: a word starting with a keyword ("rock" matches rocks, rocky),
    not negated ("no debris" does not count)."""
    words = [re.escape(k) for k in keywords if k]
    if not words or not text:
        return False
    return _affirmed(re.compile(r"\b(?:" + "|".join(words) + r")", re.IGNORECASE), text)


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


def _checks(cand: Candidates) -> dict[str, Callable[[], np.ndarray]]:
    h = cand.heading_change()
    v0, vt = cand.speed[:, 0], cand.speed[:, -1]
    yt = cand.xyz[:, -1, 1]
    stopped = _clip(1.0 - vt / SPEED_DELTA)
    return {
        "turn_left": lambda: _clip(h / TURN_RAD),
        "turn_right": lambda: _clip(-h / TURN_RAD),
        "lane_left": lambda: _clip(yt / LANE_SHIFT_M),
        "lane_right": lambda: _clip(-yt / LANE_SHIFT_M),
        "straight": lambda: _clip(1.0 - np.abs(h) / TURN_RAD),
        "stop": lambda: stopped,
        "wait": lambda: _clip(1.0 - cand.distance() / WAIT_DISTANCE_M),
        "slow": lambda: np.maximum(_clip((v0 - vt) / SPEED_DELTA), stopped),
        "accelerate": lambda: _clip((vt - v0) / SPEED_DELTA),
    }


@reward("reasoning_agreement")
def reasoning_agreement(ctx: RewardContext, cand: Candidates) -> np.ndarray:
    """Mean agreement [K] over the intentions the reasoning states; 0.5 when it states none."""
    found = intentions(ctx.reasoning)
    if not found:
        return np.full(cand.k, NEUTRAL)
    checks = _checks(cand)
    return np.mean([checks[name]() for name in found], axis=0)
