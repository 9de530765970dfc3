"""Layer profiles: PipeDream's own graph.txt files import, JSON round-trips, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legato.core.pipeline import LayerNode, LayerProfile, ProfileError

PROFILES = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "pipedream-profiles"
SHIPPED = sorted(p.parent.name for p in PROFILES.glob("*/graph.txt")) if PROFILES.exists() else []
needs_data = pytest.mark.skipif(not SHIPPED, reason=f"PipeDream profiles not found at {PROFILES}")


@needs_data
def test_all_fourteen_shipped_profiles_import():
    assert len(SHIPPED) == 14, SHIPPED
    for name in SHIPPED:
        path = PROFILES / name / "graph.txt"
        lines = path.read_text().splitlines()
        prof = LayerProfile.from_pipedream(path)
        assert len(prof.nodes) == sum(ln.startswith("node") for ln in lines), name
        assert len(prof.edges) == sum(ln.startswith("\t") for ln in lines), name
        assert len(prof.topological_order()) == len(prof.nodes)
        assert prof.meta["model"] == name and prof.compute_s > 0


@needs_data
def test_vgg16_values_are_converted_exactly():
    prof = LayerProfile.from_pipedream(PROFILES / "vgg16" / "graph.txt")
    conv = prof.node("node12")
    assert conv.desc.startswith("Conv2d(128, 256")
    assert conv.forward_s == pytest.approx(10.814e-3) and conv.backward_s == pytest.approx(
        18.335e-3)
    assert conv.activation_bytes == 411041792 and conv.parameter_bytes == 1180672
    # a straight line of layers, except that the last pooling layer (node32) feeds two nodes
    fan_out = {k: v for k, v in prof.successors().items() if len(v) > 1}
    assert fan_out == {"node32": ["node34", "node33"]}
    order = prof.topological_order()
    assert order.index("node11") < order.index("node12") < order.index("node13")


@needs_data
def test_branching_profiles_and_multi_output_activations():
    inception = LayerProfile.from_pipedream(PROFILES / "inception_v3" / "graph.txt")
    assert not inception.is_chain
    multi = [n for name in SHIPPED
             for n in LayerProfile.from_pipedream(PROFILES / name / "graph.txt").nodes
             if len(n.activation_outputs) > 1]
    assert multi, "some shipped profiles have nodes with several outputs"
    assert all(n.activation_bytes == sum(n.activation_outputs) for n in multi)


@needs_data
def test_json_round_trip_is_exact(tmp_path):
    prof = LayerProfile.from_pipedream(PROFILES / "gnmt" / "graph.txt")
    path = prof.save(tmp_path / "gnmt.json")
    again = LayerProfile.load(path)
    assert again == prof
    assert json.loads(path.read_text())["format"] == "legato.pipeline.profile"


def write(tmp_path, text, name="graph.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_pipedream_lines_name_the_line(tmp_path):
    good = ("node1 -- Input0 -- forward_compute_time=0.000, backward_compute_time=0.000, "
            "activation_size=8.0, parameter_size=0.000\n")
    with pytest.raises(ProfileError, match=r"graph.txt:2: not a PipeDream node or edge line"):
        LayerProfile.from_pipedream(write(tmp_path, good + "garbage here\n"))
    with pytest.raises(ProfileError, match="edges refer to nodes that are not in the profile"):
        LayerProfile.from_pipedream(write(tmp_path, good + "\tnode1 -- node9\n"))
    with pytest.raises(ProfileError, match="has no PipeDream node lines"):
        LayerProfile.from_pipedream(write(tmp_path, "\n"))
    with pytest.raises(ProfileError, match="cannot read"):
        LayerProfile.from_pipedream(tmp_path / "missing.txt")
    with pytest.raises(ProfileError, match=r"graph.txt:1: node node1 lacks \['parameter_size'\]"):
        LayerProfile.from_pipedream(write(tmp_path, good.replace(", parameter_size=0.000", "")))


def test_cycles_duplicates_and_bad_json_are_clear_errors(tmp_path):
    a, b = LayerNode("a", forward_s=1.0), LayerNode("b", forward_s=1.0)
    with pytest.raises(ProfileError, match="has a cycle"):
        LayerProfile((a, b), (("a", "b"), ("b", "a")))
    with pytest.raises(ProfileError, match="unique"):
        LayerProfile((a, a), ())
    with pytest.raises(ProfileError, match="negative"):
        LayerNode("c", forward_s=-1.0)
    with pytest.raises(ProfileError, match="both backward_input_s and backward_weight_s"):
        LayerNode("c", backward_input_s=0.1)
    with pytest.raises(ProfileError, match="not JSON.*--from-pipedream"):
        LayerProfile.load(write(tmp_path, "node1 -- x", "p.json"))
    with pytest.raises(ProfileError, match="not a legato pipeline profile"):
        LayerProfile.load(write(tmp_path, "{}", "p.json"))
    with pytest.raises(ProfileError, match="unknown fields"):
        LayerProfile.from_json({"format": "legato.pipeline.profile", "version": 1,
                                "nodes": [{"id": "a", "fwd": 1, "forward_s": 1.0,
                                           "backward_s": 1.0, "activation_bytes": 4,
                                           "parameter_bytes": 0}], "edges": []})
    two = [{"id": x, "forward_s": 1.0, "backward_s": 1.0, "activation_bytes": 4,
            "parameter_bytes": 0} for x in ("a", "b")]
    with pytest.raises(ProfileError, match=r'has 2 layers but no "edges".*a chain: each layer '
                                           r'to the next'):
        LayerProfile.from_json({"format": "legato.pipeline.profile", "version": 1,
                                "nodes": two})
    assert LayerProfile.from_json({"format": "legato.pipeline.profile", "version": 1,
                                   "nodes": two, "edges": []}).edges == ()
    with pytest.raises(ProfileError, match=r"node 'a' lacks \['backward_s', 'activation_bytes'"):
        LayerProfile.from_json({"format": "legato.pipeline.profile", "version": 1,
                                "nodes": [{"id": "a", "forward_s": 1.0, "parameter_bytes": 0}],
                                "edges": []})


def test_save_does_not_leave_partial_files(tmp_path):
    prof = LayerProfile((LayerNode("a", forward_s=0.5, backward_s=1.0),), ())
    path = prof.save(tmp_path / "sub" / "p.json")
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]
    assert LayerProfile.load(path).compute_s == 1.5
