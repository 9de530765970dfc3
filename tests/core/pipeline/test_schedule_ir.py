"""Schedule IR: actions print and parse back exactly, schedules round-trip as text and JSON,
generators lay out ranks as documented, and bad input is named."""

from __future__ import annotations

import json

import pytest

from legato.core.errors import ConfigError
from legato.core.pipeline.ir import (
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    format_grid,
)
from legato.core.pipeline.schedules import (
    SCHEDULES,
    add_communication,
    get_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
    zb_h1,
)

K = ActionKind

TEXTS = ["2F0", "1B3", "0I2", "0W2", "1SEND_F0@3", "2RECV_B1@4", "0SEND_B7@0", "3RECV_F2@2",
         "0ALLREDUCE1", "0STEP1", "1STASH5", "1RESTORE5", "1F5v2", "12F105v10"]


@pytest.mark.parametrize("text", TEXTS)
def test_action_text_round_trips(text):
    action = Action.parse(text)
    assert str(action) == text and repr(action) == text
    assert Action.parse(str(action)) == action
    assert hash(action) == hash(Action.parse(text))


def test_action_fields():
    assert Action.parse("1SEND_F0@3") == Action(1, K.SEND_F, 0, peer=3)
    assert Action.parse("1F5v2") == Action(1, "F", 5, version=2)
    assert Action(0, "STEP", 1).kind is K.STEP
    assert {Action.parse("2F0"), Action(2, K.FORWARD, 0)} == {Action(2, K.FORWARD, 0)}


def every_schedule():
    yield gpipe(3, 4)
    yield gpipe(2, 5, replicas=[2, 1], split_backward=True)
    yield one_f_one_b(4, 6, split_backward=True)
    yield one_f_one_b(2, 6, replicas=[3, 1])
    yield pipedream(3, 6, vertical_sync=True)
    yield pipedream(2, 6, replicas=[3, 1], split_backward=True)
    yield pipedream_2bw(3, 4, num_steps=3)
    yield interleaved_1f1b(2, 4, virtual_stages=3, split_backward=True)
    yield zb_h1(4, 6)


def test_every_generated_action_round_trips():
    for schedule in every_schedule():
        for acts in schedule.actions.values():
            for a in acts:
                assert Action.parse(str(a)) == a


def test_a_send_and_its_receive_have_one_message_key():
    """Rank 3 sends stage 1's output of microbatch 0 to rank 5, which runs stage 2; the gradient
    comes back from stage 2 on rank 5 to stage 1 on rank 3."""
    assert Action.parse("1SEND_F0@5").message_key(3) == ("F", 2, 0, 3, 5)
    assert Action.parse("2RECV_F0@3").message_key(5) == ("F", 2, 0, 3, 5)
    assert Action.parse("2SEND_B0@3").message_key(5) == ("B", 1, 0, 5, 3)
    assert Action.parse("1RECV_B0@5").message_key(3) == ("B", 1, 0, 5, 3)
    paired = 0
    for schedule in every_schedule():          # every generated send is received exactly once
        sends = [a.message_key(r) for r, acts in schedule.actions.items() for a in acts
                 if a.kind.is_send]
        recvs = [a.message_key(r) for r, acts in schedule.actions.items() for a in acts
                 if a.kind.is_recv]
        assert len(set(sends)) == len(sends) and sorted(sends) == sorted(recvs)
        paired += len(sends)
    assert paired > 100
    with pytest.raises(ScheduleError, match="1F0 is not a send or receive"):
        Action.parse("1F0").message_key(0)


@pytest.mark.parametrize("text", ["1X0", "01F0", "1F", "F0", "1F0@", "1F-1", "", "1F0v",
                                  "1SEND_F0@03", "1 F0"])
def test_malformed_action_names_the_text_and_the_form(text):
    with pytest.raises(ScheduleError) as err:
        Action.parse(text)
    assert repr(text) in str(err.value) and "<stage><KIND><microbatch>" in str(err.value)


def test_invalid_fields_are_named():
    with pytest.raises(ScheduleError, match="needs the peer rank"):
        Action.parse("1SEND_F0")
    with pytest.raises(ScheduleError, match="takes no peer"):
        Action.parse("1F0@2")
    with pytest.raises(ScheduleError, match="takes no weight version"):
        Action.parse("1B0v2")
    with pytest.raises(ScheduleError, match="unknown action kind"):
        Action(0, "X", 0)
    with pytest.raises(ScheduleError, match="stage=-1"):
        Action(-1, K.FORWARD, 0)
    assert issubclass(ScheduleError, ConfigError)


def test_schedule_round_trips_as_text_and_json():
    for schedule in every_schedule():
        text = schedule.to_text()
        assert Schedule.from_text(text) == schedule
        assert Schedule.from_text(text).to_text() == text
        data = json.loads(json.dumps(schedule.to_json()))
        assert Schedule.from_json(data) == schedule


GOLDEN_1F1B = """\
# legato pipeline schedule v1
name: 1f1b
num_microbatches: 3
stage_ranks: 0 | 1
meta: {"microbatches_per_step": 3, "num_stages": 2, "num_steps": 1, "replicas": [1, 1], \
"split_backward": false, "synchronous": true}
0: 0F0 0SEND_F0@1 0F1 0SEND_F1@1 0RECV_B0@1 0B0 0F2 0SEND_F2@1 0RECV_B1@1 0B1 0RECV_B2@1 0B2 \
0STEP0
1: 1RECV_F0@0 1F0 1B0 1SEND_B0@0 1RECV_F1@0 1F1 1B1 1SEND_B1@0 1RECV_F2@0 1F2 1B2 1SEND_B2@0 \
1STEP0
"""


def test_1f1b_golden():
    assert one_f_one_b(2, 3).to_text() == GOLDEN_1F1B


def test_schedule_accepts_text_actions_and_rejects_bad_ones():
    s = Schedule("hand", {0: ["0F0", "0SEND_F0@1"], 1: ["1RECV_F0@0", "1F0"]}, [(0,), (1,)], 1)
    assert s.actions[0][1] == Action(0, K.SEND_F, 0, 1)
    with pytest.raises(ScheduleError, match="malformed action '0G0'"):
        Schedule("hand", {0: ["0F0", "0G0"]}, [(0,)], 1)
    with pytest.raises(ScheduleError, match="rank 5, which hosts no stage"):
        Schedule("hand", {5: ["0F0"]}, [(0,)], 1)
    with pytest.raises(ScheduleError, match="names stage 3"):
        Schedule("hand", {0: ["3F0"]}, [(0,)], 1)
    with pytest.raises(ScheduleError, match="num_microbatches=0"):
        Schedule("hand", {0: []}, [(0,)], 0)
    with pytest.raises(ScheduleError, match="no stages"):
        Schedule("hand", {}, [], 1)


def test_layout_of_replicated_stages_is_round_robin():
    s = one_f_one_b(2, 6, replicas=[3, 1])
    assert s.stage_ranks == [(0, 1, 2), (3,)] and s.num_ranks == 4
    assert [s.rank_for(0, i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert {a.microbatch for a in s.actions[1] if a.kind is K.FORWARD} == {1, 4}
    assert s.stages_of(3) == (1,) and s.replicas(0) == 3
    # rank 3 receives microbatch 4 from stage 0's replica 4 % 3 = 1 and sends its gradient back
    assert Action(1, K.RECV_F, 4, 1) in s.actions[3] and Action(1, K.SEND_B, 4, 1) in s.actions[3]
    assert [a for a in s.actions[0] if a.kind is K.ALLREDUCE] == [Action(0, K.ALLREDUCE, 0)]
    assert not [a for a in s.actions[3] if a.kind is K.ALLREDUCE]


def test_interleaved_layout_puts_stage_r_plus_kp_on_rank_r():
    s = interleaved_1f1b(4, 8, virtual_stages=3)
    assert s.num_stages == 12 and s.num_ranks == 4 and s.meta["virtual_stages"] == 3
    assert s.stages_of(1) == (1, 5, 9)
    assert {a.stage for a in s.actions[2]} == {2, 6, 10}
    # the first chunk's output on the last rank goes to rank 0's second chunk
    assert Action(3, K.SEND_F, 0, 0) in s.actions[3] and Action(4, K.RECV_F, 0, 3) in s.actions[0]


def test_split_backward_emits_input_grad_send_then_weight_grad():
    s = one_f_one_b(2, 2, split_backward=True)
    acts = [str(a) for a in s.actions[1]]
    i = acts.index("1I0")
    assert acts[i:i + 3] == ["1I0", "1SEND_B0@0", "1W0"]
    assert not any(a.kind is K.BACKWARD for acts in s.actions.values() for a in acts)


def test_add_communication_skips_messages_within_a_rank():
    layout = [(0,), (0,)]
    compute = {0: [Action(0, K.FORWARD, 0), Action(1, K.FORWARD, 0), Action(1, K.BACKWARD, 0),
                   Action(0, K.BACKWARD, 0)]}
    assert add_communication(compute, layout) == compute


def test_registry_names_and_unknown_name():
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved-1f1b", "pipedream", "1f1b-rr",
                              "2bw", "zb-h1"}
    assert get_schedule("1f1b") is one_f_one_b and get_schedule("2bw") is pipedream_2bw
    assert get_schedule("interleaved-1f1b")(2, 4, virtual_stages=2).num_stages == 4
    with pytest.raises(ScheduleError) as err:
        get_schedule("zero-bubble")
    assert "'zero-bubble'" in str(err.value)
    assert "1f1b, 1f1b-rr, 2bw, gpipe, interleaved-1f1b, pipedream, zb-h1" in str(err.value)


@pytest.mark.parametrize("call, match", [
    (lambda: gpipe(0, 4), "num_stages=0"),
    (lambda: one_f_one_b(2, 0), "num_microbatches=0"),
    (lambda: one_f_one_b(2, 4, replicas=[2]), r"one int >= 1 per stage \(2 stages\)"),
    (lambda: gpipe(2, 2, replicas=[3, 1]), "pass num_microbatches >= 3"),
    (lambda: interleaved_1f1b(4, 6), "must be a multiple of 4; pass num_microbatches=8 or 4"),
    (lambda: interleaved_1f1b(2, 4, virtual_stages=0), "virtual_stages=0"),
    (lambda: pipedream(2, 5, replicas=[2, 1]), "pass a multiple of 2"),
    (lambda: pipedream(2, 4, replicas=[2, 1], vertical_sync=True), "straight pipelines only"),
    (lambda: pipedream_2bw(4, 3), "pass num_microbatches=4"),
    (lambda: pipedream_2bw(2, 3, replicas=[2, 1]), "pass num_microbatches=4"),
    (lambda: pipedream_2bw(2, 2, num_steps=0), "num_steps=0"),
])
def test_generator_arguments_are_validated(call, match):
    with pytest.raises(ScheduleError, match=match):
        call()


def test_format_grid_marks_the_cell():
    s = one_f_one_b(2, 2)
    grid = format_grid(s, (1, 2), context=1)
    lines = grid.splitlines()
    assert lines[0].split()[:3] == ["step", "rank", "0"]
    assert len(lines) == 4  # header and steps 1..3
    marked = [ln for ln in lines if "ERROR HERE" in ln]
    assert len(marked) == 1 and f">{s.actions[1][2]}<" in marked[0]
    assert str(s).count("\n") == max(len(a) for a in s.actions.values())


def test_relabel_moves_ranks_and_peers():
    s = one_f_one_b(2, 4, replicas=[2, 1])
    moved = s.relabel({0: 5, 1: 3, 2: 0})
    assert moved.stage_ranks == [(5, 3), (0,)]
    assert [str(a) for a in moved.actions[0][:2]] == ["1RECV_F0@5", "1F0"]
    assert moved.rank_for(0, 1) == 3
    assert moved.relabel({5: 0, 3: 1, 0: 2}) == s
    with pytest.raises(ScheduleError, match="distinct rank"):
        s.relabel({0: 1, 1: 1, 2: 2})
