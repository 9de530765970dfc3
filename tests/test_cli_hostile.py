"""Every command on a user's mistakes: one message naming the problem and exit 2, never a
traceback (issue 18, item 6). Malformed profiles and rule files, an output path that is a
file, a port already in use."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from legato import cli

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "legato" / "core" / "rewrite" / "rules" / "handwritten.json"

PIPEDREAM = """\
node1 -- Conv2d(3, 8) -- forward_compute_time=2.0, backward_compute_time=4.0, activation_size=1048576.0, parameter_size=896.0
node2 -- ReLU() -- forward_compute_time=0.5, backward_compute_time=0.5, activation_size=1048576.0, parameter_size=0.0
\tnode1 -- node2
"""


@pytest.fixture(scope="module")
def good_profile(tmp_path_factory) -> dict:
    from legato.core.pipeline import LayerProfile

    path = tmp_path_factory.mktemp("p") / "graph.txt"
    path.write_text(PIPEDREAM)
    return LayerProfile.from_pipedream(path).to_json()


def _mutate(data: dict, change) -> dict:
    data = copy.deepcopy(data)
    change(data)
    return data


def _node0(data: dict) -> dict:
    return data["nodes"][0]


PROFILE_CASES = {  # name -> change to a good profile, and a word the message must hold
    "id-is-a-list": (lambda d: _node0(d).__setitem__("id", ["a"]), "string \"id\""),
    "nodes-is-an-int": (lambda d: d.__setitem__("nodes", 3), "\"nodes\" is int"),
    "nan-cost": (lambda d: _node0(d).__setitem__("forward_s", float("nan")), "not finite"),
    "infinite-bytes": (lambda d: _node0(d).__setitem__("parameter_bytes", float("inf")),
                       "not finite"),
    "string-cost": (lambda d: _node0(d).__setitem__("backward_s", "fast"), "not a number"),
    "negative-cost": (lambda d: _node0(d).__setitem__("forward_s", -1), "negative"),
    "edge-of-one": (lambda d: d.__setitem__("edges", [["node1"]]), "[from, to]"),
    "edges-is-a-dict": (lambda d: d.__setitem__("edges", {"a": 1}), "\"edges\" is dict"),
    "meta-is-a-list": (lambda d: d.__setitem__("meta", [1]), "\"meta\" is list"),
    "node-is-an-int": (lambda d: d["nodes"].__setitem__(0, 5), "node #0"),
    "outputs-is-a-string": (lambda d: _node0(d).__setitem__("activation_outputs", "big"),
                            "activation_outputs"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_plan_on_a_malformed_profile(case, good_profile, tmp_path, capsys):
    change, words = PROFILE_CASES[case]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_mutate(good_profile, change), allow_nan=True))
    assert cli.main(["plan", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err, err


@pytest.mark.parametrize("pipedream", [False, True])
def test_plan_on_a_file_that_is_not_text(pipedream, tmp_path, capsys):
    path = tmp_path / "graph.txt"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    args = ["plan", str(path), "--workers", "2"] + (["--from-pipedream"] if pipedream else [])
    assert cli.main(args) == 2
    assert "not a text file" in capsys.readouterr().err


def test_a_nan_in_pipedreams_format_is_refused_not_planned(tmp_path, capsys):
    path = tmp_path / "graph.txt"
    path.write_text(PIPEDREAM.replace("forward_compute_time=2.0", "forward_compute_time=nan"))
    assert cli.main(["plan", str(path), "--from-pipedream", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "no plan" not in err, err


def _rules() -> dict:
    data = json.loads(RULES.read_text())
    data["rules"] = data["rules"][:1]
    return data


def _rule0(data: dict) -> dict:
    return data["rules"][0]


RULE_CASES = {
    "rules-is-an-int": (lambda d: d.__setitem__("rules", 3), "\"rules\" is int"),
    "rules-missing": (lambda d: d.pop("rules"), "\"rules\" is NoneType"),
    "rule-is-an-int": (lambda d: d["rules"].__setitem__(0, 7), "a rule is a JSON object"),
    "source-is-a-string": (lambda d: _rule0(d).__setitem__("source", "x"), "malformed rule"),
    "node-is-a-string": (lambda d: _rule0(d)["source"]["nodes"].__setitem__(0, "n"),
                         "malformed rule"),
    "attrs-is-a-list": (lambda d: _rule0(d)["source"]["nodes"][0].__setitem__("attrs", [1]),
                        "malformed rule"),
    "dangling-input": (lambda d: _rule0(d)["source"]["nodes"][0].__setitem__("inputs", ["zz"]),
                       "neither a pattern variable"),
    "preconditions-is-an-int": (lambda d: _rule0(d).__setitem__("preconditions", 4),
                                "malformed rule"),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rules_verify_on_a_malformed_rule_file(case, tmp_path, capsys):
    change, words = RULE_CASES[case]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(_mutate(_rules(), change)))
    assert cli.main(["rules", "verify", str(path), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err, err


def test_rules_verify_on_a_binary_file(tmp_path, capsys):
    path = tmp_path / "rules.json"
    path.write_bytes(b"\xff\xfe")
    assert cli.main(["rules", "verify", str(path)]) == 2
    assert "not a text file" in capsys.readouterr().err


def test_parity_train_into_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "models"
    target.write_text("mine")
    assert cli.main(["parity", "train", "-o", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_server_on_a_port_in_use(command, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--policy", "none", "--workers", "1"] if command == "serve" else []
        proc = subprocess.run([sys.executable, "-m", "legato.cli", command, "--model", str(model),
                               "--port", str(port), *extra], capture_output=True, text=True,
                              timeout=100, env=dict(os.environ), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "the address is in use" in proc.stderr and str(port) in proc.stderr


@pytest.mark.parametrize("argv", [
    ["loadgen", "--url", "http://127.0.0.1:9", "--rate", "nan", "--queries", "1"],
    ["parity", "train", "-o", "{tmp}/p", "--time-limit-s", "inf"],
    ["rewrite", "{tmp}/m.onnx", "-o", "{tmp}/o.onnx", "--alpha", "abc"],
    ["serve", "--model", "{tmp}/m.onnx", "--deadline-ms", "nan"],
    ["plan", "{tmp}/p.json", "--workers", "2", "--bandwidth", "fast"],
    ["demo", "--section", "nosuch"],
])
def test_nonsense_numbers_and_names_are_refused(argv, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:         # argparse's own refusal
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "o.onnx").exists()
