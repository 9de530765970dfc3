"""Rule generation: small runs rediscover known rules, deterministically, with verified output,
monotone stage counts and no duplicates; the `legato rules generate` command."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from legato.cli import main
from legato.core.rewrite._matcher import apply, find_matches
from legato.core.rewrite.generate import (
    DEFAULT_ENVS, GenerateResult, GenerationError, generate_rules, parse_shapes,
)
from legato.core.rewrite.pattern import load_rules
from legato.core.rewrite.verify import verify_numeric
from legato.core.stop import StopReason

SMALL = ["Add", "Mul", "MatMul", "Transpose", "Relu"]
PIPELINE = ["candidates", "constant", "single root", "renaming", "common subgraph", "trivial",
            "implied", "resized", "numeric"]


@pytest.fixture(scope="module")
def small() -> GenerateResult:
    return generate_rules(2, ops=SMALL, seed=0)


def _docs(result: GenerateResult) -> dict[str, list]:
    out: dict[str, list] = {}
    for rule in result.rules:
        out.setdefault(rule.doc, []).append(rule)
    return out


def test_small_run_finds_the_known_rules(small):
    docs = _docs(small)
    assert "Add(x0,x1) -> Add(x1,x0)" in docs                                   # commutativity
    assert "Transpose{perm=10}(Transpose{perm=10}(x0)) -> Identity(x0)" in docs  # to a variable
    assert "MatMul(MatMul(x0,x1),x2) -> MatMul(x0,MatMul(x1,x2))" in docs        # associativity
    assert "Relu(Transpose{perm=10}(x0)) -> Transpose{perm=10}(Relu(x0))" in docs
    # transpose-of-transpose is written with an Identity root and the variable's rank
    rule, = docs["Transpose{perm=10}(Transpose{perm=10}(x0)) -> Identity(x0)"]
    assert [n.op for n in rule.target.nodes] == ["Identity"] and rule.origin == "generated"
    assert ("rank", ("x0", 2)) in rule.preconditions
    assert len(rule.examples) == len(DEFAULT_ENVS) and rule.name.startswith("gen-")


def test_distributivity_and_concat_of_matmul_at_three_ops():
    docs = _docs(generate_rules(3, ops=["Add", "MatMul"], max_vars=3))
    assert "Add(MatMul(x0,x1),MatMul(x0,x2)) -> MatMul(x0,Add(x1,x2))" in docs
    docs = _docs(generate_rules(3, ops=["Concat", "MatMul"], max_vars=3))
    assert ("Concat{axis=1}(MatMul(x0,x1),MatMul(x0,x2)) -> "
            "MatMul(x0,Concat{axis=1}(x1,x2))") in docs
    assert ("Concat{axis=0}(MatMul(x0,x1),MatMul(x2,x1)) -> "
            "MatMul(Concat{axis=0}(x0,x2),x1)") in docs


def test_same_seed_same_rules_names_and_order(small):
    again = generate_rules(2, ops=SMALL, seed=0)
    assert json.dumps([r.to_json() for r in again.rules]) == \
        json.dumps([r.to_json() for r in small.rules])
    assert again.stages == small.stages


def test_every_emitted_rule_passes_numeric_verification_again():
    result = generate_rules(2, ops=SMALL + ["Concat", "Split", "ReduceSum", "Reshape"],
                            verify=False)
    assert len(result.rules) > 50
    for rule in result.rules:
        assert verify_numeric(rule)["numeric"] == "passed", rule.doc


def test_stage_counts_are_reported_and_monotone(small):
    names = [name for name, _, _ in small.stages]
    assert names == ["graphs", "classes", *PIPELINE]
    counts = [small.count(name) for name in PIPELINE]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > counts[-1] == len(small.rules) > 0
    assert small.count("graphs") >= small.count("classes")
    text = small.summary()
    assert all(name in text for name in names) and "stop: exhausted" in text


def test_renaming_equivalent_graphs_collapse(small):
    keys = [(r.doc, r.preconditions) for r in small.rules]
    assert len(keys) == len(set(keys))
    # three x-kind and three y-kind copies give nine Add(xi, xj) pairs: one rule per shape class
    comm = [r for r in small.rules if r.doc == "Add(x0,x1) -> Add(x1,x0)" and
            dict(r.preconditions).get("rank") is not None]
    same_2d = [r for r in comm if r.preconditions == (
        ("rank", ("x0", 2)), ("rank", ("x1", 2)),
        ("dim_eq", (("x0", 0), ("x1", 0))), ("dim_eq", (("x0", 1), ("x1", 1))))]
    assert len(same_2d) == 1
    assert small.count("renaming") < small.count("single root")


def test_a_graph_is_never_paired_with_itself():
    result = generate_rules(1, ops=["Identity", "Relu", "Transpose"])
    assert all(r.source != r.target for r in result.rules)
    assert all(r.doc.split(" -> ")[0] != r.doc.split(" -> ")[1] for r in result.rules)
    assert result.count("trivial") < result.count("common subgraph")   # Identity(x) -> x


def test_rules_that_hold_only_for_unit_dimensions_are_dropped():
    result = generate_rules(1, ops=["Transpose"])
    # Transpose(perm 0132) of a (k, k, 1, 1) weight equals it, but not for other sizes
    assert not [r for r in result.rules if r.doc.startswith("Transpose{perm=0132}(x0) ->")]
    assert result.count("resized") < result.count("implied")


def test_generated_rule_applies_through_the_matcher():
    result = generate_rules(3, ops=["Add", "MatMul"], max_vars=3)
    rule, = [r for r in result.rules
             if r.doc == "Add(MatMul(x0,x1),MatMul(x0,x2)) -> MatMul(x0,Add(x1,x2))"
             and all(v[1] == 2 for k, v in r.preconditions if k == "rank")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w1 = helper.make_tensor_value_info("w1", TensorProto.FLOAT, [3, 4])
    w2 = helper.make_tensor_value_info("w2", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    proto = onnx.shape_inference.infer_shapes(helper.make_model(
        helper.make_graph(nodes, "g", [x, w1, w2], [y]),
        opset_imports=[helper.make_opsetid("", 17)]))
    model = ir.serde.deserialize_model(proto)
    matches = find_matches(model.graph, rule)
    assert len(matches) == 1
    apply(model.graph, matches[0])
    assert sorted(n.op_type for n in model.graph) == ["Add", "MatMul"]


def test_split_reshape_and_reducesum_rules_carry_constant_nodes():
    result = generate_rules(2, ops=["Concat", "Split", "ReduceSum", "Transpose"])
    docs = _docs(result)
    assert "Concat{axis=0}(Split{axis=0}(x0)#0,Split{axis=0}(x0)#1) -> Identity(x0)" in docs
    reduce = [r for r in result.rules if "ReduceSum" in r.doc]
    assert reduce and all(any(n.op == "Constant" for n in r.source.nodes + r.target.nodes)
                          for r in reduce)
    assert all(not r.source.nodes[-1].op == "Split" for r in result.rules)   # single root


def test_time_limit_stops_with_a_reason():
    result = generate_rules(3, ops=SMALL, time_limit_s=0.0)
    assert result.stop_reason is StopReason.TIME_LIMIT
    assert "stop: time-limit" in result.summary()
    assert json.loads(json.dumps(result.meta()))["stop_reason"] == "time-limit"
    done = generate_rules(1, ops=["Add", "Neg"], verify=False)
    assert done.stop_reason is StopReason.EXHAUSTED and "stop: exhausted" in done.summary()


def test_bad_settings_name_the_fix():
    with pytest.raises(GenerationError, match="known: .*MatMul"):
        generate_rules(2, ops=["Add", "Frobnicate"])
    with pytest.raises(GenerationError, match="LRN has semantics but no generation menu"):
        generate_rules(2, ops=["Add", "LRN"])
    with pytest.raises(GenerationError, match="max_ops=0"):
        generate_rules(0)
    with pytest.raises(GenerationError, match="lacks"):
        parse_shapes("a=2,b=3")
    with pytest.raises(GenerationError, match="must be even"):
        parse_shapes("a=2,b=4,c=6,d=3,n=2,k=3,h=3,w=5")
    envs = parse_shapes("a=2,b=4,c=6,d=3,n=2,k=4,h=3,w=5;a=4,b=6,c=2,d=5,n=4,k=2,h=5,w=3")
    assert envs == tuple(DEFAULT_ENVS[:2])


def test_cli_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "rules.json"
    argv = ["rules", "generate", "--max-ops", "1", "--ops", "Add,Transpose", "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "candidates" in captured.out and f"rules written to {out}" in captured.out
    rules = load_rules(out)
    assert rules and all(r.origin == "generated" and r.status["numeric"] == "passed"
                         for r in rules)
    meta = json.loads(out.read_text())["meta"]
    assert meta["config"]["ops"] == ["Add", "Transpose"] and "renaming" in meta["stages"]
    before = out.read_text()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert load_rules(out)
    again = tmp_path / "again.json"
    assert main([*argv[:-1], str(again)]) == 0 and main([*argv, "--overwrite"]) == 0
    assert again.read_bytes() == out.read_bytes()            # one seed, one file
    assert main(["rules", "generate", "--ops", "Nope", "-o", str(tmp_path / "x.json")]) == 2
    assert "known:" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_formal_records_z3_status_when_asked():
    pytest.importorskip("z3")
    plain = generate_rules(1, ops=["Add"])
    assert plain.rules and all(r.status["z3"] == "not run" for r in plain.rules)
    proved = generate_rules(1, ops=["Add"], formal=True)
    assert [r.name for r in proved.rules] == [r.name for r in plain.rules]
    assert all(r.status["z3"] == "proved" for r in proved.rules)


def test_ship_keeps_proved_rules_that_shrink_the_graph(tmp_path, capsys):
    pytest.importorskip("z3")
    out = tmp_path / "ship.json"
    argv = ["rules", "generate", "--max-ops", "2", "--ops", "Add,Neg,Transpose", "--ship",
            "-o", str(out)]
    assert main(argv) == 0
    assert "shippable" in capsys.readouterr().out
    rules = load_rules(out)
    docs = {r.doc for r in rules}
    assert "Add(x0,Neg(x1)) -> Sub(x0,x1)" not in docs          # Sub is not among the ops
    assert "Transpose{perm=10}(Transpose{perm=10}(x0)) -> Identity(x0)" in docs
    assert rules and all(r.verified for r in rules)
    assert all(sum(n.op != "Identity" for n in r.target.nodes) < len(r.source.nodes)
               for r in rules)
    assert main([*argv[:-2], "--no-verify", "-o", str(tmp_path / "x.json")]) == 2
    assert "--no-verify" in capsys.readouterr().err


def test_the_shipped_generated_rules_are_proved_shrinking_and_from_a_recorded_run():
    from legato.core.rewrite.generate import shrinks
    from legato.core.rewrite.rules import RULES_DIR

    path = RULES_DIR / "generated.json"
    rules = load_rules(path)
    assert len(rules) >= 20 and all(r.verified and shrinks(r) for r in rules)
    meta = json.loads(path.read_text())["meta"]
    assert meta["config"]["max_ops"] == 2 and meta["stages"]["shippable"] == len(rules)
