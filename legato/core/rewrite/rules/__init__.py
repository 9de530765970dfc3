"""The shipped rule set: JSON files in this folder (`handwritten.json`, later `generated.json`),
each rule stored with its verification record. `shipped_rules()` returns the rules whose
verification passed; `all_rules()` every stored rule."""

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
    """The rules whose stored verification record says they passed."""
    return [r for r in all_rules() if r.status.get("numeric") == "passed"]
