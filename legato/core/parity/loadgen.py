"""An open-loop load generator for prediction services (`legato loadgen`).

    legato loadgen --url http://127.0.0.1:8000 --rate 200 --queries 5000 --dataset digits --json

Arrivals are Poisson at `rate` queries per second on an *absolute* schedule drawn up front from
a seed: query i is due at t0 + s_i, and its latency is measured from s_i, not from when it was
actually sent. A service that stalls therefore shows every query that arrived during the stall
as late, as its users would see them; a closed loop, or a schedule of relative sleeps, would
send fewer queries during the stall and hide them (coordinated omission). Latencies are
recorded at the client in an HDR histogram (1 us to 10 min, 3 significant digits).

The report: queries sent, replies received, errors by kind, p50/p99/p99.9/max in ms, replies by
the service's `source` field (original, reconstructed, default), goodput (successful replies
within the deadline per second), the fraction within the deadline, and how far the generator
itself fell behind its schedule. A `default` reply (the service gave up on the query) is a
reply but not goodput.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any, Sequence

import numpy as np

from legato.core.errors import BackendUnavailable, ConfigError

__all__ = ["run_load", "schedule"]


def schedule(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of n Poisson arrivals at `rate` per second, from a seed."""
    if n < 1 or rate <= 0:
        raise ConfigError(f"need queries >= 1 and rate > 0; got {n} and {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps) - gaps[0]


async def run_load(url: str, queries: Sequence[np.ndarray], rate: float, *, n: int,
                   seed: int = 0, deadline_ms: float | None = None, timeout_s: float = 30.0,
                   max_open: int = 10000) -> dict[str, Any]:
    """Send n queries (cycling through `queries`) to `url`/v1/predict on a Poisson schedule.

    Args:
        url: the service's base URL (http://127.0.0.1:PORT).
        queries: query arrays; each is sent as an npy body.
        rate: mean arrival rate, queries per second.
        n: how many queries to send.
        deadline_ms: what counts toward goodput (default: every successful reply).
        timeout_s: a reply later than this counts as an error ("timeout").
        max_open: connections the client may hold open at once.
    """
    try:
        import aiohttp
        from hdrh.histogram import HdrHistogram
    except ImportError as err:
        raise BackendUnavailable(f"the load generator needs aiohttp and hdrhistogram ({err}); "
                                 "pip install 'legato[serve]'") from err
    if not queries:
        raise ConfigError("no queries to send")
    bodies = [_npy(q) for q in queries]
    offsets = schedule(n, rate, seed)
    hist = HdrHistogram(1, 600_000_000, 3)              # microseconds
    sources: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    good = within = 0
    behind = 0.0
    target = url.rstrip("/") + "/v1/predict"
    conn = aiohttp.TCPConnector(limit=max_open)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        loop = asyncio.get_running_loop()

        async def one(i: int, due: float) -> None:
            nonlocal good, within
            try:
                async with session.post(target, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/x-npy"}) as resp:
                    text = await resp.text()
                    done = loop.time()
                    if resp.status != 200:
                        errors[f"http {resp.status}"] += 1
                        return
                    source = json.loads(text).get("source", "?")
                    sources[source] += 1
            except asyncio.TimeoutError:
                errors["timeout"] += 1
                return
            except (aiohttp.ClientError, OSError, ValueError) as err:
                errors[type(err).__name__] += 1
                return
            latency = max(done - due, 1e-6)
            hist.record_value(int(latency * 1e6))
            good += 1
            if source != "default" and (deadline_ms is None or latency * 1e3 <= deadline_ms):
                within += 1

        start = loop.time() + 0.05
        tasks = []
        for i, off in enumerate(offsets):
            due = start + float(off)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            behind = max(behind, loop.time() - due)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    pct = (lambda p: hist.get_value_at_percentile(p) / 1e3) if good else (lambda p: None)
    return {
        "url": url, "rate": rate, "seed": seed, "queries_sent": n, "replies": good,
        "errors": dict(errors), "p50_ms": pct(50), "p99_ms": pct(99), "p99.9_ms": pct(99.9),
        "max_ms": hist.get_max_value() / 1e3 if good else None,
        "mean_ms": hist.get_mean_value() / 1e3 if good else None,
        "by_source": dict(sources), "deadline_ms": deadline_ms,
        "within_deadline": within / n, "goodput_qps": within / elapsed if elapsed > 0 else None,
        "seconds": elapsed, "generator_behind_ms": behind * 1e3, "time": time.time(),
        # the latency CDF at fixed percentiles (for plots): [[percentile, ms], ...]
        "cdf_ms": [[p, hist.get_value_at_percentile(p) / 1e3] for p in _CDF_POINTS]
        if good else [],
    }


_CDF_POINTS = [*range(1, 90), *(90 + i / 4 for i in range(36)), 99.1, 99.2, 99.3, 99.4, 99.5,
               99.6, 99.7, 99.8, 99.9, 99.95, 99.99, 100.0]


def _npy(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(x), allow_pickle=False)
    return buf.getvalue()
