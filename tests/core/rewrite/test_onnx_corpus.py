"""Every model of the onnx package's backend test corpus through `optimize` (issue 15, item 2):
node, simple, light, real, pytorch-converted and pytorch-operator, one test each
(`node/test_abs`, `light/light_resnet50`, ...), with a small budget and a cost cache of this
module's own.

Each result must pass onnx's checker (full_check where the input does), keep the input's
inputs, outputs, opsets and IR version (or the report says why the IR version rose), compute
the original's outputs on the case's own test data (onnxruntime where it runs the original,
else onnx's ReferenceEvaluator; random inputs where a case has no data), and carry
`legato.rewrite.applied` when accepted; a model that is not rewritten comes back as the very
object given, unmodified. A refusal must be a RewriteError with one of the reasons listed in
REFUSED for that model; a new refusal fails. What cannot be checked (neither runtime runs the
original, or a random operator) is printed by the test and listed in the summary, never
skipped. Since few corpus models match any rule, a second test runs modelio alone on each
(`prepare`, then `finish` with no rewrite) under the same checks.

The checks live in benchmarks/_onnx_corpus.py, shared with `legato bench rewrite-corpus`,
which prints the same summary: per folder, models refused, unchanged, rewritten but not kept,
and rewritten and accepted. This module prints it at its end too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"legato_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


corpus = _load("_onnx_corpus")
CASES = corpus.cases()

# Models `optimize` refuses, with the reason its RewriteError must give; any other refusal
# fails the test. None today: a model with an input type legato makes no random values for
# (int4, float4, float8e8m0: 74 node tests) is searched like any other and, where no rule
# matches, given back unchanged; where one matches, given back with the reason.
REFUSED: dict[str, str] = {}

# Known bugs outside this test's reach, each (what, test on the outcome): the test is marked
# xfail with the reason, so the run says how many remain; delete an entry once it is fixed.
# (Fixed: a segment timed alone fed made-up integers to shape inputs, and its failing bound
# run escaped optimize on 154 models.)
KNOWN_BUGS: list = []


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, request):
    """The module's own cost cache, the results shared by cases of the same file (light and
    real), quiet onnxruntime logs (the cost model tries sessions that may fail), and the
    summary written to the terminal at the end."""
    outcomes: list = []
    shared: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGATO_COST_CACHE", str(tmp_path_factory.mktemp("corpus") / "op_costs.json"))
        mp.delenv("LEGATO_NO_COST_CACHE", raising=False)
        ort.set_default_logger_severity(4)
        try:
            yield outcomes, shared
        finally:
            ort.set_default_logger_severity(2)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not outcomes:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line(f"onnx backend corpus through optimize ({len(outcomes)} models):")
        for line in corpus.summarize(outcomes):
            reporter.write_line(line[:300])


def test_the_corpus_has_every_folder():
    folders = {c.folder for c in CASES}
    assert folders == set(corpus.FOLDERS)
    counts = {f: sum(c.folder == f for c in CASES) for f in corpus.FOLDERS}
    assert counts["node"] > 1500 and counts["light"] == counts["real"] >= 9, counts
    assert len({c.id for c in CASES}) == len(CASES)
    assert set(REFUSED) <= {c.id for c in CASES}


# the light CNNs (and the real cases, the same files) take seconds each; the rest, milliseconds
PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.folder in ("light", "real")
                       else []) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_optimize_keeps_the_model_valid_and_equal(case, corpus_run):
    outcomes, shared = corpus_run
    outcome = corpus.run(case, corpus.options_for(case), shared)
    outcomes.append(outcome)
    for note in outcome.notes:
        print(f"{case.id}: not checked: {note}")
    for what, matches in KNOWN_BUGS:
        if outcome.problems and matches(outcome):
            outcome.known = what
            pytest.xfail(f"known bug: {what}")
    assert outcome.status != "error", f"optimize raised instead of refusing with a " \
        f"RewriteError: {outcome.problems[0]}"
    expected = REFUSED.get(case.id)
    if outcome.status == "refused":
        assert expected is not None, f"a new refusal (add it to REFUSED with its reason if it " \
            f"is right): {outcome.reason}"
        assert re.search(expected, outcome.reason), outcome.reason
    else:
        assert expected is None, f"listed in REFUSED ({expected}), but optimize now gives " \
            f"{outcome.status}: {outcome.reason}; remove it from REFUSED"
    assert not outcome.problems, "\n".join(outcome.problems)


# real/* are light/* files again (only their tolerances differ): modelio sees the same model
@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0].folder != "real"])
def test_prepare_and_finish_alone_give_back_a_valid_equal_model(case):
    """modelio without a rewrite: what `optimize` would return for this model had a rule
    matched (most corpus models match none, so the test above rarely gets that far)."""
    problems, notes = corpus.round_trip(case)
    for note in notes:
        print(f"{case.id}: not checked: {note}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_wrong_result(tmp_path, monkeypatch):
    """The checks themselves: a result whose outputs, interface or metadata differ from the
    original's is reported (a planted wrong rewrite of node/test_relu)."""
    monkeypatch.setenv("LEGATO_COST_CACHE", str(tmp_path / "op_costs.json"))
    case = next(c for c in CASES if c.id == "node/test_relu")
    original = onnx.ModelProto()
    original.CopyFrom(case.load())                         # this test changes it
    wrong = onnx.ModelProto()
    wrong.CopyFrom(original)
    wrong.graph.node[0].op_type = "Abs"                    # other values, same interface
    wrong.ir_version = original.ir_version + 1

    class Accepted:
        accepted, applied, ir_version_change = True, ["planted"], None

    problems, notes = corpus.check(case, original, original.SerializeToString(), wrong,
                                   Accepted())
    text = "\n".join(problems)
    assert "values beyond" in text and "IR version" in text and "metadata_props" in text, text
    wrong.graph.output[0].name = "other"
    problems, _ = corpus.check(case, original, original.SerializeToString(), wrong, Accepted())
    assert any("outputs changed" in p for p in problems)

    class Kept:
        accepted, applied, ir_version_change = False, [], None

    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    problems, _ = corpus.check(case, original, original.SerializeToString(), copy, Kept())
    assert any("another model" in p for p in problems)
    bytes_before = original.SerializeToString()
    original.graph.node[0].name = "touched"
    problems, _ = corpus.check(case, original, bytes_before, original, Kept())
    assert any("modified the model" in p for p in problems)


def test_a_random_operator_is_noted_not_failed():
    """Bernoulli draws anew on each run: the outputs cannot be compared, and the check says so
    instead of failing."""
    case = next(c for c in CASES if c.id == "node/test_bernoulli")
    problems, notes = corpus.round_trip(case)
    assert not problems and any("random operator" in n for n in notes), (problems, notes)


def test_a_raised_exception_is_an_error_not_a_refusal(monkeypatch):
    """`optimize` raising anything but RewriteError is recorded as an error with its frames."""
    import legato.core.rewrite as rewrite

    def broken(model, **_):
        raise KeyError("boom")

    monkeypatch.setattr(rewrite, "optimize", broken)
    case = next(c for c in CASES if c.id == "node/test_relu")
    outcome = corpus.run(case, {})
    assert outcome.status == "error" and "KeyError" in outcome.reason
    assert "boom" in "".join(outcome.problems)


def test_legato_bench_rewrite_corpus_prints_the_summary(tmp_path):
    """`legato bench rewrite-corpus` runs the same cases and checks and prints the table."""
    out = tmp_path / "corpus.json"
    env = {**os.environ, "LEGATO_COST_CACHE": str(tmp_path / "op_costs.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "legato.cli", "bench", "rewrite-corpus", "--", "--folders",
         "pytorch-operator,light", "--match", "_sq", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "folder" in proc.stdout and "accepted" in proc.stdout
    result = json.loads(out.read_text())
    assert {o["case"] for o in result["outcomes"]} == {
        "pytorch-operator/test_operator_sqrt", "light/light_squeezenet"}
    assert all(o["status"] in ("unchanged", "not-kept", "accepted") for o in result["outcomes"])
