"""The planner's state space: the cut points a pipeline may split a layer DAG at.

A stage boundary in a DAG is an *ideal* (a set of layers closed under predecessors: everything
before the cut); a stage is the difference of two nested ideals. PipeDream enumerates them as
antichains (an ideal is determined by its maximal layers); the number of ideals is exponential
in the width of the graph (221,564 for Inception-v3), so the planner bounds it:

- `exact`: every ideal, when there are at most `max_states` of them (chains, ResNets,
  DenseNet, GNMT);
- `linearized`: otherwise the ideals along one depth-first topological order (a branch is
  finished before its sibling starts), so a stage is a contiguous run of that order;
- `coarsened`: when even that order is longer than `max_states`, consecutive layers are grouped
  at compute quantiles, each group boundary moved to the smallest activation cut near it.

`--mode pipedream` plans over PipeDream's own state space instead (`antichain`, built by
`_antichain_dag` below from the description of its released optimizer): the antichains reached
from the first source by advancing one layer of an *augmented* antichain at a time, in a
depth-first topological order of that antichain DAG; a stage may end at state j after state k
only when k precedes j in the DAG, and the activations a state sends on are those of its
augmented antichain (its maximal layers plus every earlier layer with an edge leaving the
maximal layers' predecessors), not only of its maximal layers. When the DAG has more than
`max_states` states the bounded spaces above are used, with a note.

Every space keeps only cut points that leave each group of `meta["same_stage"]` whole: layers
the runtime must run in one stage (a non-tensor value such as an int from `x.size()` flows
between them). Layers sharing a trainable parameter (`meta["tied"]`) are kept whole as well
with `keep_tied`; otherwise they may be split, and `StateSpace.tied` lists them for the
planner to cost the summing of the copies' gradients. The profilers record both.

Masks are Python ints over `node_ids` (bit i = node_ids[i]). `stop_reason` is EXHAUSTED for an
exact space and BUDGET when `max_states` cut the enumeration short.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from legato.core.pipeline.profile import LayerProfile, ProfileError
from legato.core.stop import StopReason

__all__ = ["StateSpace", "build_states"]


@dataclasses.dataclass
class StateSpace:
    """Ideals sorted by size (the last is every layer) with their prefix totals."""

    node_ids: list[str]
    masks: list[int]
    compute_s: np.ndarray            # forward + backward time of the layers in the ideal
    activation_bytes: np.ndarray     # sum of the layers' output activations (what a stage stashes)
    parameter_bytes: np.ndarray
    optimizer_state_bytes: np.ndarray
    update_s: np.ndarray             # optimizer step time over the ideal's parameters
    cut_bytes: np.ndarray            # activations leaving the ideal (layers with a successor out)
    frontier_bytes: np.ndarray       # activations of the ideal's maximal layers (PipeDream's)
    preds: list[np.ndarray]          # preds[j]: indices k a stage may start after to end at j
    #                                  (masks[k] a proper subset of masks[j]; antichain: k
    #                                  reaches j in the antichain DAG)
    kind: str                        # "exact", "antichain", "linearized" or "coarsened"
    notes: list[str]
    attached: dict[str, str]         # dropped layer -> the layer whose stage it joins
    stop_reason: StopReason = StopReason.EXHAUSTED   # BUDGET: max_states bounded the ideals
    tied: list[tuple[int, float, str]] = dataclasses.field(default_factory=list)
    #                                  (mask of layers, bytes, parameter) of each tied parameter
    #                                  a stage may hold only part of (keep_tied=False)

    @property
    def size(self) -> int:
        return len(self.masks)

    def nodes_of(self, mask: int) -> list[str]:
        return [self.node_ids[i] for i in range(len(self.node_ids)) if (mask >> i) & 1]


def _drop_io(profile: LayerProfile) -> tuple[list[str], dict[str, str]]:
    """PipeDream's convention: `Input*` sources and `__getitem__` sinks carry no cost and are not
    cut points; each joins the stage of the layer it feeds or reads."""
    succ, pred = profile.successors(), profile.predecessors()
    attached: dict[str, str] = {}
    for n in profile.nodes:
        if not pred[n.id] and n.desc.startswith("Input") and succ[n.id]:
            attached[n.id] = succ[n.id][0]
        elif not succ[n.id] and n.desc.startswith("__getitem__") and pred[n.id]:
            attached[n.id] = pred[n.id][0]
    for x in list(attached):          # a placeholder attached to a placeholder: follow the chain
        seen = {x}
        while attached[x] in attached and attached[x] not in seen:
            seen.add(attached[x])
            attached[x] = attached[attached[x]]
    kept = [n.id for n in profile.nodes if n.id not in attached]
    if not kept:
        raise ProfileError("the profile has only Input/__getitem__ placeholder layers; "
                           "profile the model's real layers")
    return kept, attached


def _depth_first_order(ids: list[str], succ: dict[str, list[str]],
                       pred: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm taking the most recently enabled layer first (ties: file order)."""
    position = {x: i for i, x in enumerate(ids)}
    indeg = {x: sum(1 for p in pred[x] if p in position) for x in ids}
    stack = sorted((x for x in ids if indeg[x] == 0), key=position.get, reverse=True)
    order = []
    while stack:
        x = stack.pop()
        order.append(x)
        ready = []
        for y in succ[x]:
            if y in position:
                indeg[y] -= 1
                if indeg[y] == 0:
                    ready.append(y)
        stack.extend(sorted(ready, key=position.get, reverse=True))
    return order


def _enumerate_ideals(n: int, pred_mask: list[int], limit: int) -> list[int] | None:
    """All non-empty ideals, or None if there are more than `limit`."""
    seen = {0}
    frontier = [0]
    while frontier:
        nxt = []
        for ideal in frontier:
            for v in range(n):
                if not (ideal >> v) & 1 and (pred_mask[v] & ~ideal) == 0:
                    grown = ideal | (1 << v)
                    if grown not in seen:
                        seen.add(grown)
                        if len(seen) > limit + 1:
                            return None
                        nxt.append(grown)
        frontier = nxt
    seen.discard(0)
    return list(seen)


def _layer_groups(profile: LayerProfile, key: str, index: dict[str, int],
                  attached: dict[str, str], form: str) -> list[tuple[int, dict]]:
    """The entries of `profile.meta[key]` as (mask of layers, entry), for groups of two or
    more layers; a malformed entry or an unknown layer is a ProfileError."""
    out = []
    for entry in profile.meta.get(key) or ():
        try:
            ids = list(entry["nodes"])
        except (TypeError, KeyError) as err:
            raise ProfileError(f"meta.{key} holds {entry!r}; each entry must be {form}") from err
        unknown = [x for x in ids if attached.get(x, x) not in index]
        if unknown:
            raise ProfileError(f"meta.{key} names layers {unknown} that the profile does not "
                               "have; profile the model again")
        mask = 0
        for x in ids:
            mask |= 1 << index[attached.get(x, x)]
        if mask.bit_count() > 1:
            out.append((mask, entry))
    return out


def _same_stage(profile: LayerProfile, index: dict[str, int], attached: dict[str, str]
                ) -> list[tuple[int, str]]:
    """The profile's `meta["same_stage"]` as (mask of layers, why): layers the runtime can only
    run in one stage (a non-tensor value flows between them; in profiles written before
    `meta["tied"]`, also layers sharing a parameter)."""
    return [(mask, str(entry.get("why", ""))) for mask, entry in _layer_groups(
        profile, "same_stage", index, attached, '{"nodes": [layer ids], "why": text}')]


def _tied(profile: LayerProfile, index: dict[str, int], attached: dict[str, str]
          ) -> list[tuple[int, float, str]]:
    """The profile's `meta["tied"]` as (mask of layers, bytes, parameter name)."""
    out = []
    for mask, entry in _layer_groups(profile, "tied", index, attached,
                                     '{"nodes": [layer ids], "parameter": name, "bytes": size}'):
        name = str(entry.get("parameter", "?"))
        try:
            nbytes = float(entry.get("bytes", 0))
        except (TypeError, ValueError):
            nbytes = float("nan")
        if not nbytes >= 0:
            raise ProfileError(f"meta.tied gives parameter {name} {entry.get('bytes')!r} "
                               "bytes; give a size >= 0")
        out.append((mask, nbytes, name))
    return out


def _antichain_dag(n: int, out: list[list[int]], anc: list[int], desc: list[int],
                   first: int, limit: int):
    """PipeDream's antichain DAG over layers 0..n-1 (indices in file-derived topological order).

    Returns (augmented antichains, DAG successor lists) with states numbered in discovery order,
    or None past `limit` states. A state is an antichain (its maximal layers); its augmented
    form adds every predecessor p of an antichain layer a with an edge leaving a's predecessors
    (to neither a predecessor of a nor a itself). A next state replaces one layer x of the
    augmented form by a successor y of x that is not in the antichain and has no descendant in
    the augmented form, and keeps the maximal layers of the result."""
    def augment(antichain: tuple[int, ...]) -> list[int]:
        extra = set()
        for a in antichain:
            inside = anc[a] | (1 << a)
            m = anc[a]
            while m:
                p = (m & -m).bit_length() - 1
                m &= m - 1
                if any(not (inside >> o) & 1 for o in out[p]):
                    extra.add(p)
        return sorted(extra) + list(antichain)

    def maximal(layers: list[int]) -> tuple[int, ...]:
        bits = 0
        for x in layers:
            bits |= 1 << x
        kept: list[int] = []
        for x in layers:
            if not desc[x] & bits and x not in kept:
                kept.append(x)
        return tuple(kept)

    key = lambda a: frozenset(a)  # noqa: E731
    start = (first,)
    ids = {key(start): 0}
    augmented = [augment(start)]
    edges: list[list[int]] = [[]]
    expanded: set[frozenset] = set()
    queue = [start]
    head = 0
    while head < len(queue):
        antichain = queue[head]
        head += 1
        k = key(antichain)
        if k in expanded:
            continue
        expanded.add(k)
        aug = augmented[ids[k]]
        aug_bits = 0
        for x in aug:
            aug_bits |= 1 << x
        members = set(antichain)
        for x in aug:
            for y in out[x]:
                if y in members or desc[y] & aug_bits:
                    continue
                nxt = maximal([y if z == x else z for z in aug])
                nk = key(nxt)
                if nk not in ids:
                    if len(ids) >= limit:
                        return None
                    ids[nk] = len(augmented)
                    augmented.append(augment(nxt))
                    edges.append([])
                edges[ids[k]].append(ids[nk])
                queue.append(nxt)
    return augmented, edges


def _dag_order(edges: list[list[int]]) -> list[int]:
    """Reverse post-order of a depth-first search that starts from the states in discovery
    order and follows each state's edges in the order they were found (PipeDream's sort)."""
    done = [False] * len(edges)
    post: list[int] = []
    for root in range(len(edges)):
        if done[root]:
            continue
        done[root] = True
        stack = [(root, iter(edges[root]))]
        while stack:
            node, it = stack[-1]
            for nxt in it:
                if not done[nxt]:
                    done[nxt] = True
                    stack.append((nxt, iter(edges[nxt])))
                    break
            else:
                stack.pop()
                post.append(node)
    return post[::-1]


def _antichain_space(profile: LayerProfile, order: list[str], index: dict[str, int],
                     succ_mask: list[int], max_states: int):
    """(masks, frontier bytes, preds) of PipeDream's antichain DAG, or None when it has more
    than `max_states` states or does not end at the whole graph."""
    n = len(order)
    out = [[] for _ in range(n)]
    for a, b in profile.edges:
        if a in index and b in index:
            out[index[a]].append(index[b])
    desc = [0] * n
    for i in range(n - 1, -1, -1):
        m = succ_mask[i]
        d = m
        while m:
            j = (m & -m).bit_length() - 1
            m &= m - 1
            d |= desc[j]
        desc[i] = d
    anc = [0] * n
    for i in range(n):                 # `order` is topological: predecessors come first
        for j in out[i]:
            anc[j] |= anc[i] | (1 << i)
    has_pred = [bool(a) for a in anc]
    file_pos = {x.id: p for p, x in enumerate(profile.nodes)}
    sources = sorted((i for i in range(n) if not has_pred[i]), key=lambda i: file_pos[order[i]])
    if not sources:
        return None
    built = _antichain_dag(n, out, anc, desc, sources[0], max_states)
    if built is None:
        return None
    augmented, edges = built
    topo = _dag_order(edges)
    where = {s: t for t, s in enumerate(topo)}
    masks, frontier = [], []
    act = [float(profile.node(x).activation_bytes) for x in order]
    for s in topo:
        m = 0
        for x in augmented[s]:
            m |= anc[x] | (1 << x)
        masks.append(m)
        frontier.append(sum(act[x] for x in augmented[s]))
    if masks[-1] != (1 << n) - 1:
        return None
    reach = [0] * len(topo)            # bit k set: state k precedes state t in the DAG
    for t, s in enumerate(topo):
        for nxt in edges[s]:
            reach[where[nxt]] |= reach[t] | (1 << t)
    preds = [np.array([k for k in range(t) if (reach[t] >> k) & 1], dtype=np.int64)
             for t in range(len(topo))]
    return masks, np.array(frontier), preds


def build_states(profile: LayerProfile, *, max_states: int = 1000,
                 space: str = "ideals", keep_tied: bool = True) -> StateSpace:
    """Build the cut points of `profile` within `max_states` (see the module docstring);
    `space="antichain"` builds PipeDream's antichain DAG instead of every ideal; `keep_tied`
    keeps the layers of each tied parameter in one stage."""
    kept, attached = _drop_io(profile)
    succ, pred = profile.successors(), profile.predecessors()
    order = [x for x in profile.topological_order() if x in set(kept)]
    index = {x: i for i, x in enumerate(order)}
    n = len(order)
    pred_mask = [0] * n
    succ_mask = [0] * n
    for a, b in profile.edges:
        if a in index and b in index:
            pred_mask[index[b]] |= 1 << index[a]
            succ_mask[index[a]] |= 1 << index[b]
    notes: list[str] = []
    if attached:
        notes.append(f"{len(attached)} input/output placeholder layers (Input*, __getitem__ "
                     "sinks) join the stage of the layer they feed or read; their costs are "
                     "not counted (as PipeDream zeroes them)")

    together = _same_stage(profile, index, attached)
    tied = _tied(profile, index, attached)
    if keep_tied:
        together += [(g, f"they share the parameter {name}") for g, _, name in tied]
        tied = []
    pre_dropped = 0
    dag = None
    if space == "antichain":
        dag = _antichain_space(profile, order, index, succ_mask, max_states)
        if dag is None:
            notes.append(f"PipeDream's antichain DAG of this graph has more than {max_states} "
                         "states; planned over the bounded cut points below instead")
    masks = dag[0] if dag is not None else _enumerate_ideals(n, pred_mask, max_states)
    kind = "antichain" if dag is not None else "exact"
    if masks is None:
        linear = _depth_first_order(order, succ, pred)
        prefixes = [0]
        for x in linear:
            prefixes.append(prefixes[-1] | (1 << index[x]))
        # only prefixes that keep every same-stage group whole can be cut points
        allowed = [c for c in range(1, n + 1)
                   if c == n or all(prefixes[c] & g in (0, g) for g, _ in together)]
        cuts = allowed
        pre_dropped = n - len(allowed)
        kind = "linearized"
        if len(allowed) > max_states:
            cuts = _coarse_cuts(linear, index, profile, succ_mask, max_states, set(allowed))
            kind = "coarsened"
        masks = [prefixes[c] for c in cuts]
        notes.append(
            f"the layer graph has more than {max_states} cut points (ideals); planned over the "
            f"{len(masks)} prefixes of one depth-first layer order"
            + (f", grouping {n} layers into {len(masks)} runs at compute quantiles"
               if kind == "coarsened" else "")
            + " (raise max_states for an exact search)")
    if together:
        full = (1 << n) - 1
        keep = [all(m & g in (0, g) for g, _ in together) or m == full for m in masks]
        dropped = keep.count(False) + pre_dropped
        if dag is not None:
            where = {old: new for new, old in enumerate(i for i, k in enumerate(keep) if k)}
            dag = ([m for m, k in zip(masks, keep) if k], dag[1][np.array(keep)],
                   [np.array([where[k] for k in ks if k in where], dtype=np.int64)
                    for ks, k in zip(dag[2], keep) if k])
        masks = [m for m, k in zip(masks, keep) if k]
        why = "; ".join(f"{', '.join(sorted(order[i] for i in range(n) if (g >> i) & 1))}: "
                        f"{w}" for g, w in together)
        notes.append(f"{dropped} cut points dropped to keep layers in one stage ({why})")
    if dag is None:
        masks.sort(key=lambda m: (m.bit_count(), m))

    nodes = {x: profile.node(x) for x in order}
    vec = lambda f: np.array([f(nodes[x]) for x in order], dtype=np.float64)  # noqa: E731
    comp, act = vec(lambda d: d.compute_s), vec(lambda d: d.activation_bytes)
    par, opt = vec(lambda d: d.parameter_bytes), vec(lambda d: d.optimizer_state_bytes)
    upd = vec(lambda d: d.update_s)
    bits = np.array([[(m >> i) & 1 for i in range(n)] for m in masks], dtype=np.float64)
    cut = np.zeros(len(masks))
    frontier = np.zeros(len(masks))
    for j, m in enumerate(masks):
        for i in range(n):
            if (m >> i) & 1:
                if succ_mask[i] & ~m:
                    cut[j] += act[i]
                if not succ_mask[i] & m:
                    frontier[j] += act[i]
    if dag is not None:
        frontier, preds = dag[1], dag[2]
    else:
        preds = [np.array([k for k in range(j) if masks[k] != m and masks[k] & ~m == 0],
                          dtype=np.int64) for j, m in enumerate(masks)]
    return StateSpace(order, masks, bits @ comp, bits @ act, bits @ par, bits @ opt, bits @ upd,
                      cut, frontier, preds, kind, notes, attached,
                      StopReason.EXHAUSTED if kind in ("exact", "antichain")
                      else StopReason.BUDGET, tied)


def _coarse_cuts(linear: list[str], index: dict[str, int], profile: LayerProfile,
                 succ_mask: list[int], groups: int, allowed: set[int]) -> list[int]:
    """`groups` prefix lengths of `linear` among `allowed`: compute quantiles, each moved to
    the smallest activation cut within half a group of it."""
    n = len(linear)
    cost = np.array([profile.node(x).compute_s for x in linear])
    cum = np.cumsum(cost)
    total = cum[-1] if cum[-1] > 0 else 1.0
    # activation bytes crossing each prefix boundary c (layers linear[:c] vs the rest)
    crossing = np.zeros(n + 1)
    open_bytes: list[tuple[int, float]] = []   # (last consumer position, bytes)
    pos = {x: i for i, x in enumerate(linear)}
    for i, x in enumerate(linear):
        consumers = [pos[y] for y in profile.successors()[x] if y in pos]
        if consumers:
            heapq.heappush(open_bytes, (max(consumers), float(profile.node(x).activation_bytes)))
        while open_bytes and open_bytes[0][0] <= i:
            heapq.heappop(open_bytes)
        crossing[i + 1] = sum(b for _, b in open_bytes)
    chosen = {n}
    half = max(1, n // (2 * groups))
    for q in range(1, groups):
        target = int(np.searchsorted(cum, total * q / groups)) + 1
        lo, hi = max(1, target - half), min(n - 1, target + half)
        if lo > hi:
            continue
        near = [c for c in range(lo, hi + 1) if c in allowed]
        if near:
            chosen.add(min(near, key=lambda c: (crossing[c], abs(c - target))))
    return sorted(chosen)
