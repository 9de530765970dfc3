"""Chunk plans: partitioning into views, merging small tensors, identical on every rank."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.core.errors import ConfigError
from legato.core.scheduler.plan import CommTask, make_plan


def tasks_of(sizes, itemsize=4):
    return [CommTask(k, f"p{k}", layer=k, nbytes=n, itemsize=itemsize) for k, n in enumerate(sizes)]


def test_whole_tensors_one_chunk_each_in_layer_order():
    tasks = [CommTask(0, "b", 2, 40), CommTask(1, "a", 0, 80), CommTask(2, "c", 1, 8)]
    plan = make_plan(tasks)
    assert [(c.layer, c.keys, c.nbytes) for c in plan.chunks] == [(0, (1,), 80), (1, (2,), 8),
                                                                    (2, (0,), 40)]
    assert [c.id for c in plan.chunks] == [0, 1, 2]


def test_partition_cuts_views_on_element_boundaries():
    plan = make_plan(tasks_of([100]), partition_bytes=30)  # 30 -> 28 (7 floats)
    assert [(p.offset, p.nbytes) for c in plan.chunks for p in c.parts] == [
        (0, 28), (28, 28), (56, 28), (84, 16)]
    assert plan.chunks_of(0) == (0, 1, 2, 3)


def test_merge_adjacent_small_tensors_up_to_threshold():
    plan = make_plan(tasks_of([8, 8, 8, 400, 8, 8]), partition_bytes=1000, merge_bytes=20)
    assert [c.keys for c in plan.chunks] == [(0, 1), (2,), (3,), (4, 5)]
    assert plan.chunks[0].merged and plan.chunks[0].nbytes == 16 and plan.chunks[0].layer == 0
    assert plan.chunks_of(4) == plan.chunks_of(5) == (3,)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000).map(lambda n: n * 4), min_size=1, max_size=30),
       partition=st.one_of(st.none(), st.integers(4, 3000)),
       merge=st.integers(0, 400))
def test_property_every_byte_sent_exactly_once(sizes, partition, merge):
    if partition is not None and merge > partition:
        merge = partition
    plan = make_plan(tasks_of(sizes), partition_bytes=partition, merge_bytes=merge)
    covered = {k: [] for k in range(len(sizes))}
    for chunk in plan.chunks:
        assert chunk.nbytes == sum(p.nbytes for p in chunk.parts)
        if partition is not None and not chunk.merged:
            assert chunk.nbytes <= max(partition, 4)
        if chunk.merged:
            assert chunk.nbytes <= merge
        for p in chunk.parts:
            covered[p.key].append((p.offset, p.nbytes))
    for k, ranges in covered.items():
        ranges.sort()
        pos = 0
        for offset, n in ranges:
            assert offset == pos and offset % 4 == 0
            pos += n
        assert pos == sizes[k]
    # every rank that builds the same plan agrees on its digest
    again = make_plan(tasks_of(sizes), partition_bytes=partition, merge_bytes=merge)
    assert again.digest() == plan.digest()


def test_digest_differs_when_the_model_differs():
    assert make_plan(tasks_of([8, 16])).digest() != make_plan(tasks_of([16, 8])).digest()


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition_bytes=0), "partition_bytes=0 is invalid"),
    (dict(merge_bytes=-1), "merge_bytes=-1 is invalid"),
    (dict(partition_bytes=16, merge_bytes=32), "merge_bytes=32 exceeds partition_bytes=16"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(tasks_of([8]), **kwargs)


def test_bad_tasks():
    with pytest.raises(ConfigError, match="multiple of itemsize"):
        CommTask(0, "w", 0, 10, itemsize=4)
    with pytest.raises(ConfigError, match="keys must be unique"):
        make_plan([CommTask(0, "a", 0, 4), CommTask(0, "b", 1, 4)])


def test_merging_keeps_one_dtype_per_message():
    """A merged message is one flat buffer: tensors of different dtypes are never joined
    (torch.cat would promote them); DDP's buckets likewise hold one dtype."""
    from legato.core.scheduler.plan import bucket_plan

    tasks = [CommTask(0, "a", 0, 400, 4, "torch.float32"), CommTask(1, "b", 1, 200, 2,
                                                                     "torch.float16"),
             CommTask(2, "c", 2, 200, 2, "torch.float16"), CommTask(3, "d", 3, 400, 4,
                                                                   "torch.float32")]
    plan = make_plan(tasks, merge_bytes=4096)
    assert [c.keys for c in plan.chunks] == [(0,), (1, 2), (3,)]
    buckets = bucket_plan(tasks, bucket_bytes=4096, first_bucket_bytes=4096)
    assert [c.keys for c in buckets.chunks] == [(3,), (2, 1), (0,)]
