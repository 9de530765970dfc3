"""Graph rewriting after TASO: operator semantics, rules as verified data, matching on onnx-ir,
measured costs, cost-based search, and `optimize(model)` (`optimize_file(src, dst)` for files of
any size), which returns a rewritten ONNX model only when it is measured faster with equal
outputs."""

from legato._extras import require

require("onnx", "onnx_ir", "onnxruntime", what="legato's graph rewriting (legato.core.rewrite)")

# ruff: noqa: E402 (the imports below need the packages checked above)

from legato.core.rewrite.explain import MatchResult, explain_model, explain_rule, near_misses
from legato.core.rewrite.generate import GenerateResult, GenerationError, generate_rules
from legato.core.rewrite.ops import OPS, OpDef, ShapeError, get_op
from legato.core.rewrite.optimize import (Report, RewriteError, fold_constants, optimize,
                                          optimize_file)
from legato.core.rewrite.pattern import PNode, Pattern, Rule, RuleError, load_rules, save_rules
from legato.core.rewrite.rules import all_rules, shipped_rules
from legato.core.rewrite.verify import verify_numeric

__all__ = ["GenerateResult", "GenerationError", "MatchResult", "OPS", "OpDef", "PNode", "Pattern",
           "Report", "RewriteError", "Rule", "RuleError", "ShapeError", "all_rules",
           "explain_model", "explain_rule", "fold_constants", "generate_rules", "get_op",
           "load_rules", "near_misses", "optimize", "optimize_file", "save_rules",
           "shipped_rules", "verify_numeric"]
