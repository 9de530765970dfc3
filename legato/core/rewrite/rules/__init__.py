"""The shipped rule set: JSON files in this folder, each rule stored with its verification
record (`legato rules verify --write`): `handwritten.json` (transpose chains, scalars into
weights, Conv+BatchNormalization folding, LRN as a banded 1x1 Conv), `merges.json` (k-branch
rule families, built by `families.py`) and `generated.json` (`legato rules generate --max-ops 2
--ship`: generated rules proved with Z3 that shrink the graph).
`shipped_rules()` returns the rules that were both proved with Z3 and checked in float64;
`all_rules()` every stored rule."""

from __future__ import annotations

from pathlib import Path

from legato.core.rewrite.pattern import Rule, load_rules

__all__ = ["RULES_DIR", "all_rules", "shipped_rules"]

RULES_DIR = Path(__file__).parent


def all_rules() -> list[Rule]:
    """Every rule stored in this folder, in file order."""
    rules: list[Rule] = []
    for path in sorted(RULES_DIR.glob("*.json")):
        rules.extend(load_rules(path))
    return rules


def shipped_rules() -> list[Rule]:
    """The rules whose stored record says Z3 proved them and the float64 check passed."""
    return [r for r in all_rules() if r.verified]
