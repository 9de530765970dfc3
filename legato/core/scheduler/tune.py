"""Online auto-tuning of bytescheduler's partition and credit sizes, and the pass-through rule.

The tuner runs inside a training job, on rank 0 only, and never restarts it. Training is cut
into *trials* at step boundaries: at each boundary every rank finishes its outstanding
communication and updates (`synchronize`), rank 0 turns the step times it measured since the
last boundary into a `Decision` (the settings of the next steps, and the step at which the
next boundary comes) and sends it to every rank, and all ranks switch at once.

A trial runs `warmup_steps` steps, which are not measured (the first one after a boundary has
no communication of a previous step to overlap), then `steps_per_trial` measured ones; its
value is the median step time (the time between two `opt.step()` calls on rank 0).

[Note: what is searched] Two integers, so that trials are comparable and a grid search over
the same space is the obvious check: log2 of `partition_bytes` (64 KiB up to the largest
gradient, at most 64 MiB) and log2 of the credit window in partitions (1 to 16). Bayesian
optimization is optuna's: by default its Gaussian-process sampler (`GPSampler`, expected
improvement, as ByteScheduler's tuner did) where its dependencies (torch, scipy) are installed,
else its TPE sampler (numpy only: MXNet's environment, whose numpy<1.24 no current scipy
supports); `sampler` picks one. The first trial is the user's
own setting (or the defaults), enqueued into the study.

[Note: pass-through] Scheduling pays for itself only when communication is not already hidden
behind backward. So one trial runs the `plain` policy (DDP's buckets in arrival order, one
optimizer step after every bucket is in: what DDP does), and at the end of tuning the best
bytescheduler setting and `plain` are measured again, alternately (twice each when `trials`
is at least 8, else once); `plain` is kept unless the best setting's fresh steps are at least
`passthrough_margin` (2%) faster than plain's (the best setting's first trial was picked for
being low, so it is not used: that bias, on a machine whose step times vary by 10% or more,
had tipped decisions either way).

[Note: a decision noise cannot flip] The confirmation steps of the two, measured alternately
so that drift hits both alike, give the ratio of their medians and a `confidence` (90%)
bootstrap interval of it (resampling each side's steps, seeded: the same steps give the same
interval). When the whole interval is below 1 - margin the best setting is kept; when it is
wholly above, plain; when it straddles the line the difference is within the job's own noise,
and another pair of confirmations is measured, up to `max_confirm_pairs` more; still
undecided then, plain is kept (scheduling that cannot be told from noise does not pay for
itself). `summary()["confirmation"]` gives the ratio, the interval, the pairs and the noise
(the spread of plain's confirmation steps: interquartile range over median).

[Note: drift] After tuning, a boundary comes every `check_every` steps. Its window's median
step time is compared with a reference (the first such window); when it has moved by more
than `drift` (20%) in two windows in a row, the job is tuned again (the current setting is the
first trial of the new study).

[Note: stop reason] A round stops when its `trials` are measured; `OnlineTuner.stop_reason`
(None while a round runs) then says EXHAUSTED if the round measured every setting of the
search space, else BUDGET (the trial budget ran out with settings left untried).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import statistics
import threading
import time
from typing import Any, Callable

from legato.core.errors import ConfigError
from legato.core.scheduler.policy import SchedulerConfig, resolve_config
from legato.core.stop import StopReason

__all__ = ["Decision", "OnlineTuner", "TuneSettings", "TuningSession", "search_space"]

log = logging.getLogger(__name__)

KiB = 1 << 10
MIN_LOG2_PARTITION = 16  # 64 KiB
MAX_LOG2_PARTITION = 26  # 64 MiB
MAX_LOG2_CREDIT = 4      # 16 partitions


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How the online tuner runs (the defaults suit jobs of a few hundred steps or more).

    Args:
        trials: measured trials per tuning round, pass-through and confirmations included
            (four confirmations from 8 trials on, else two).
        steps_per_trial: measured steps per trial (their median is the trial's value).
        warmup_steps: steps after each boundary that are not measured.
        sampler: "gp" (optuna's Gaussian-process Bayesian optimization; needs torch and
            scipy), "tpe" (optuna's tree-structured Parzen estimator), or "auto": "gp" where
            torch and scipy are installed, else "tpe".
        seed: the sampler's seed.
        passthrough: whether `plain` is a candidate (the pass-through rule).
        passthrough_margin: bytescheduler is kept only if at least this much faster.
        check_every: steps between drift checks once tuned (0: never re-tune).
        drift: relative change of step time that triggers re-tuning (twice in a row).
        confidence: of the interval on the best setting's speed-up over plain that must
            clear the margin ([Note: a decision noise cannot flip]).
        max_confirm_pairs: confirmation pairs added, at most, while that interval straddles
            the margin.
    """

    trials: int = 20
    steps_per_trial: int = 8
    warmup_steps: int = 2
    sampler: str = "auto"
    seed: int = 0
    passthrough: bool = True
    passthrough_margin: float = 0.02
    check_every: int = 200
    drift: float = 0.2
    confidence: float = 0.9
    max_confirm_pairs: int = 4

    def __post_init__(self) -> None:
        if self.trials < 4:
            raise ConfigError(f"trials={self.trials} is too few: tuning needs at least 4 (the "
                              "starting setting, pass-through and two confirmations)")
        if self.steps_per_trial < 1 or self.warmup_steps < 1:
            raise ConfigError("steps_per_trial and warmup_steps must be at least 1 (the step "
                              "after a boundary is never representative)")
        if self.sampler not in ("auto", "gp", "tpe"):
            raise ConfigError(f"sampler={self.sampler!r} is unknown; known: 'auto', 'gp', "
                              "'tpe'")
        if not 0 <= self.passthrough_margin < 1 or not 0 < self.drift < 10:
            raise ConfigError("passthrough_margin must be in [0, 1) and drift in (0, 10)")
        if self.check_every < 0:
            raise ConfigError("check_every must be >= 0 (0: never re-tune)")
        if not 0.5 <= self.confidence < 1 or self.max_confirm_pairs < 0:
            raise ConfigError("confidence must be in [0.5, 1) and max_confirm_pairs >= 0")

    @classmethod
    def from_arg(cls, tune: Any) -> "TuneSettings | None":
        """`tune=` as users pass it: False/None, True (defaults), a dict, or TuneSettings."""
        if tune is None or tune is False:
            return None
        if tune is True:
            return cls()
        if isinstance(tune, cls):
            return tune
        if isinstance(tune, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(tune) - known)
            if unknown:
                raise ConfigError(f"tune={{...}} has unknown keys {unknown}; known: "
                                  f"{sorted(known)}")
            return cls(**tune)
        raise ConfigError(f"tune={tune!r} is invalid; pass True, False, a dict of TuneSettings "
                          "fields or a TuneSettings")

    @property
    def trial_steps(self) -> int:
        return self.warmup_steps + self.steps_per_trial


@dataclasses.dataclass(frozen=True)
class Decision:
    """What every rank runs from a boundary on, and where the next boundary is (a step count:
    the boundary happens inside the `opt.step()` call that makes `steps` reach it)."""

    config: SchedulerConfig
    next_boundary: int
    phase: str  # "tuning", "confirming" or "tuned"


def search_space(largest_tensor_bytes: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(min, max) of log2(partition_bytes) and of log2(credit in partitions)."""
    top = max(MIN_LOG2_PARTITION, min(MAX_LOG2_PARTITION,
                                      max(1, largest_tensor_bytes - 1).bit_length()))
    return (MIN_LOG2_PARTITION, top), (0, MAX_LOG2_CREDIT)


def _config(log2_partition: int, log2_credit: int, merge_bytes: int | None) -> SchedulerConfig:
    partition = 1 << log2_partition
    return resolve_config("bytescheduler", partition_bytes=partition,
                          credit_bytes=partition << log2_credit,
                          merge_bytes=None if merge_bytes is None else min(merge_bytes,
                                                                           partition))


def _params_of(config: SchedulerConfig, space) -> dict[str, int]:
    (plo, phi), (clo, chi) = space
    lp = min(phi, max(plo, (config.partition_bytes or 1).bit_length() - 1))
    lc = min(chi, max(clo, (max(1, (config.credit_bytes or 1) // (1 << lp))).bit_length() - 1))
    return {"log2_partition": lp, "log2_credit": lc}


_OPTUNA: list = []  # optuna, once loaded


def _load_optuna():
    """optuna, imported (with the modules it imports on first use) on a thread of its own.

    [Note: optuna's kept tracebacks] optuna imports its optional dependencies inside
    `try_import()` blocks (redis, cmaes, ...), which keep the ImportError of each one missing,
    traceback and all, for as long as the process lives; a traceback's frames link through
    f_back to every caller's frame, locals included. Imported from an optimizer's constructor,
    that kept the constructor's locals alive to the end: with MXNet a kvstore, which must be
    freed before interpreter exit (ps-lite aborted the worker there). A thread's stack ends at
    the thread, so nothing of the caller is kept."""
    if _OPTUNA:
        return _OPTUNA[0]
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            # the storage and sampler modules a study imports on first use
            optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
            optuna.samplers.GPSampler  # noqa: B018 (imported lazily otherwise)
            box["optuna"] = optuna
        except ImportError as err:
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=load, name="legato-load-optuna", daemon=True)
    thread.start()
    thread.join()
    if "optuna" not in box:
        raise ConfigError(f"tune=True needs optuna ({box.get('error', 'import failed')}); "
                          "install it with pip install 'legato[tune]'")
    _OPTUNA.append(box["optuna"])
    return box["optuna"]


def _bootstrap_ratio(ours: list[float], theirs: list[float], confidence: float, *,
                     seed: int, draws: int = 400) -> tuple[float, float]:
    """A `confidence` bootstrap interval of median(ours) / median(theirs): each side's steps
    resampled with replacement `draws` times (seeded, so the same steps give the same
    interval)."""
    import random

    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(ours, k=len(ours)))
                    / statistics.median(rng.choices(theirs, k=len(theirs)))
                    for _ in range(draws))
    tail = (1 - confidence) / 2
    return ratios[int(tail * (draws - 1))], ratios[int((1 - tail) * (draws - 1))]


class OnlineTuner:
    """Rank 0's side of online tuning; see the module docstring.

    Args:
        settings: how to tune.
        start: the setting of the first trial (a bytescheduler config).
        largest_tensor_bytes: bounds the partition sizes worth trying.
        step: the step count now (the first boundary is a trial's length later).
        plain: the pass-through's setting (default: `plain` with DDP's buckets; MXNet's is
            one message per gradient, as gluon's Trainer sends them).
    """

    def __init__(self, settings: TuneSettings, start: SchedulerConfig,
                 largest_tensor_bytes: int, *, step: int = 0,
                 plain: SchedulerConfig | None = None) -> None:
        if start.policy != "bytescheduler":
            raise ConfigError(f"tuning searches bytescheduler's partition and credit sizes; "
                              f"policy={start.policy!r} has none: use policy='bytescheduler'")
        self.settings = settings
        # [Note: a round without samples] With 4 trials (the starting setting, plain and one
        # confirmation pair) nothing is sampled: the round is a measured choice between the
        # starting setting and plain, and runs without optuna (the defaults' check on
        # TensorFlow and MXNet, where optuna is an optional extra).
        self._optuna = _load_optuna() if self._sampled_trials(settings) > 0 else None
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if settings.sampler == "gp" and missing and self._optuna is not None:
            raise ConfigError(f"sampler='gp' (optuna's GPSampler) needs {' and '.join(missing)}"
                              ", not installed here; install them, or pass "
                              "tune={'sampler': 'tpe'} (or 'auto')")
        self.sampler = ("none" if self._optuna is None else settings.sampler
                        if settings.sampler != "auto" else "tpe" if missing else "gp")
        self.space = search_space(largest_tensor_bytes)
        self._merge = start.merge_bytes
        self._plain = plain or resolve_config("plain")
        self.history: list[tuple[SchedulerConfig, float]] = []  # every measured trial
        self.rounds = 0
        self.stop_reason: StopReason | None = None   # why the last round stopped (None: running)
        self.current = start
        self._begin_round(start)
        self.first = Decision(self.current, step + settings.trial_steps, "tuning")

    # -- rounds --------------------------------------------------------------------------------
    @staticmethod
    def _sampled_trials(s: TuneSettings) -> int:
        """Trials of a round that optuna samples (the study's trials after the starting one)."""
        return s.trials - 2 * (2 if s.trials >= 8 else 1) - (1 if s.passthrough else 0) - 1

    def _begin_round(self, start: SchedulerConfig) -> None:
        s = self.settings
        optuna = self._optuna
        self._study = None  # [Note: a round without samples]
        if optuna is not None:
            if self.sampler == "gp":
                sampler = optuna.samplers.GPSampler(seed=s.seed + self.rounds,
                                                    n_startup_trials=4)
            else:
                sampler = optuna.samplers.TPESampler(seed=s.seed + self.rounds,
                                                     n_startup_trials=4)
            self._study = optuna.create_study(direction="minimize", sampler=sampler)
            if start.policy == "bytescheduler":
                self._study.enqueue_trial(_params_of(start, self.space))
        self._trial = None  # the optuna trial being measured, if any
        # Trials left: pass-through (if on), study trials, then the confirmations (two pairs
        # of the best setting and plain when the budget allows, else one pair).
        self._pairs = 2 if s.trials >= 8 else 1
        self._study_left = s.trials - 2 * self._pairs - (1 if s.passthrough else 0)
        self._plain_pending = s.passthrough
        self._confirm: list[SchedulerConfig] = []
        self._round_values: dict[SchedulerConfig, list[float]] = {}
        self._confirmed: dict[SchedulerConfig, list[float]] = {}
        self._samples: dict[SchedulerConfig, list[float]] = {}  # every measured step
        self._extra_pairs = 0
        self.confirmation: dict[str, Any] | None = None
        self.phase = "tuning"
        self.stop_reason = None
        self._ref: float | None = None
        self._drifted = 0
        self.rounds += 1
        if start.policy == "bytescheduler" and self._study is None:
            self._study_left -= 1
            self._trial_config = _config(**_params_of(start, self.space),
                                         merge_bytes=self._merge)
            self.current = self._trial_config
        elif start.policy == "bytescheduler":
            self._trial = self._study.ask()
            self._study_left -= 1
            self._trial_config = self._config_of(self._trial)
            # An enqueued trial gets its params from the queue: the same config as `start`,
            # up to rounding into the searched grid.
            self.current = self._trial_config
        else:  # re-tuning from plain: measure plain first
            self._plain_pending = False
            self.current = self._plain

    def _config_of(self, trial) -> SchedulerConfig:
        (plo, phi), (clo, chi) = self.space
        return _config(trial.suggest_int("log2_partition", plo, phi),
                       trial.suggest_int("log2_credit", clo, chi), self._merge)

    # -- boundaries ----------------------------------------------------------------------------
    def boundary(self, step: int, step_times_s: list[float]) -> Decision:
        """Step times of the steps since the last boundary (warm-up included) -> next Decision."""
        measured = step_times_s[self.settings.warmup_steps:] or step_times_s
        value = statistics.median(measured) if measured else float("inf")
        if self.phase == "tuned":
            return self._check_drift(step, value)
        self.history.append((self.current, value))
        self._round_values.setdefault(self.current, []).append(value)
        if self.phase == "confirming":
            self._confirmed.setdefault(self.current, []).extend(measured)
        self._samples.setdefault(self.current, []).extend(measured)
        if self._trial is not None:
            self._study.tell(self._trial, value)
            self._trial = None
        nxt = self._next_trial()
        if nxt is None:
            return self._finish(step)
        self.current = nxt
        return Decision(nxt, step + self.settings.trial_steps, self.phase)

    def _next_trial(self) -> SchedulerConfig | None:
        if self.phase == "tuning":
            if self._plain_pending:
                self._plain_pending = False
                return self._plain
            if self._study_left > 0:
                self._study_left -= 1
                self._trial = self._study.ask()
                return self._config_of(self._trial)
            self.phase = "confirming"
            best = self._best_scheduled()
            # Alternate the best setting and plain, so that drift hits both alike; without
            # the pass-through the budget goes to the best setting alone.
            pair = [c for c in (best, self._plain if self.settings.passthrough else None)
                    if c is not None]
            self._confirm = pair * self._pairs
            while len(self._confirm) < 2 * self._pairs and best is not None:
                self._confirm.append(best)
        if self._confirm:
            return self._confirm.pop(0)
        if (self.settings.passthrough and self._extra_pairs < self.settings.max_confirm_pairs
                and self._verdict()[0] is None):
            # within the job's own noise: measure another pair ([Note: a decision noise...])
            self._extra_pairs += 1
            best = self._best_scheduled()
            if best is not None:
                self._confirm = [self._plain]
                return best
        return None

    def _verdict(self) -> tuple[bool | None, dict[str, Any]]:
        """Whether the best setting clearly beats plain by the margin (True), clearly does not
        (False) or cannot be told from noise (None), from the confirmation steps, with what
        was computed."""
        best = self._best_scheduled()
        ours = self._confirmed.get(best, []) if best is not None else []
        theirs = self._confirmed.get(self._plain, [])
        if not ours or not theirs:
            return None, {}
        ratio = statistics.median(ours) / statistics.median(theirs)
        lo, hi = _bootstrap_ratio(ours, theirs, self.settings.confidence,
                                  seed=self.settings.seed + self.rounds)
        line = 1 - self.settings.passthrough_margin
        verdict = True if hi < line else False if lo > line else None
        q = statistics.quantiles(theirs, n=4) if len(theirs) >= 2 else [theirs[0]] * 3
        info = {"ratio": ratio, "interval": [lo, hi], "confidence": self.settings.confidence,
                "pairs": len(ours) // max(1, self.settings.steps_per_trial),
                "noise": (q[2] - q[0]) / statistics.median(theirs)}
        return verdict, info

    def _mean(self, config: SchedulerConfig) -> float:
        values = self._round_values.get(config, [])
        return sum(values) / len(values) if values else float("inf")

    def _best_scheduled(self) -> SchedulerConfig | None:
        scheduled = [c for c in self._round_values if c.policy == "bytescheduler"]
        return min(scheduled, key=lambda c: min(self._round_values[c]), default=None)

    def _finish(self, step: int) -> Decision:
        best = self._best_scheduled()
        choice = best
        if self.settings.passthrough and self._plain in self._round_values:
            # The best setting was picked for its lowest value, which is biased low: judge it
            # on its fresh confirmation steps alone, against plain's ([Note: a decision noise
            # cannot flip]); undecided after every extra pair: plain.
            verdict, self.confirmation = self._verdict()
            if verdict is None and not self.confirmation:   # no confirmation steps (trials)
                plain = statistics.median(self._samples[self._plain])
                scheduled = self._mean(best) if best is not None else float("inf")
                verdict = scheduled <= plain * (1 - self.settings.passthrough_margin)
            if self.confirmation:
                self.confirmation["verdict"] = ("best" if verdict else "plain" if verdict is
                                                False else "undecided: plain")
            if not verdict:
                choice = self._plain
        assert choice is not None
        self.phase = "tuned"
        (plo, phi), (clo, chi) = self.space
        tried = {tuple(_params_of(c, self.space).values()) for c in self._round_values
                 if c.policy == "bytescheduler"}
        size = (phi - plo + 1) * (chi - clo + 1)
        self.stop_reason = StopReason.EXHAUSTED if len(tried) >= size else StopReason.BUDGET
        self.current = choice
        self._ref = None
        self._drifted = 0
        log.info("legato tuner: chose %s after %d trials, stopped: %s (%s)",
                 choice.describe(), len(self.history), self.stop_reason,
                 ", ".join(f"{c.describe()}: {self._mean(c) * 1e3:.1f} ms"
                           for c in self._round_values))
        every = self.settings.check_every
        return Decision(choice, step + every if every else -1, "tuned")

    def _check_drift(self, step: int, value: float) -> Decision:
        every = self.settings.check_every
        if self._ref is None:
            self._ref = value
        elif abs(value / self._ref - 1) > self.settings.drift:
            self._drifted += 1
        else:
            self._drifted = 0
        if self._drifted >= 2:
            log.info("legato tuner: step time moved from %.1f ms to %.1f ms; tuning again",
                     self._ref * 1e3, value * 1e3)
            self._begin_round(self.current)
            return Decision(self.current, step + self.settings.trial_steps, "tuning")
        return Decision(self.current, step + every, "tuned")

    def summary(self) -> dict[str, Any]:
        """What was measured and chosen (for logs, stats and benchmarks)."""
        return {"phase": self.phase, "rounds": self.rounds, "chosen": self.current.describe(),
                "sampler": self.sampler,
                "stop_reason": self.stop_reason,
                "trials": [(c.describe(), v) for c, v in self.history],
                "confirmation": self.confirmation}


class TuningSession:
    """An adapter's side of online tuning, the same for every framework: it times the steps
    between boundaries on every rank, says when a boundary is due, and there has rank 0's
    `OnlineTuner` decide and `broadcast` carry the decision to every rank. The adapter does
    the rest: finish the step's work before `decide`, and switch to the decision's settings
    after it.

    Args:
        settings: how to tune (`TuneSettings.from_arg` of the adapter's `tune` argument).
        config: the setting the job was built with (the first trial starts from it).
        largest_tensor_bytes: the largest gradient (bounds the partition sizes tried).
        step: the step count now.
        plain: the pass-through's setting (OnlineTuner's `plain`).
    """

    def __init__(self, settings: TuneSettings, config: SchedulerConfig,
                 largest_tensor_bytes: int, *, step: int = 0,
                 plain: SchedulerConfig | None = None) -> None:
        self.tuner = OnlineTuner(settings, config, largest_tensor_bytes, step=step,
                                 plain=plain)
        first = self.tuner.first
        self.config, self.next_boundary, self.phase = first.config, first.next_boundary, \
            first.phase
        self.step_times: list[float] = []
        self._last: float | None = None

    def step_called(self, steps_called: int) -> bool:
        """Record a step's end (the time since the previous one); whether `steps_called` is
        a boundary."""
        now = time.perf_counter()
        if self._last is not None and self.next_boundary >= 0:
            self.step_times.append(now - self._last)
        self._last = now
        return steps_called == self.next_boundary

    def decide(self, steps_called: int, *, leader: bool,
               broadcast: Callable[[Any], Any]) -> Decision:
        """At a boundary (every rank, after finishing the step's work): rank 0's decision,
        from the step times since the last boundary, on every rank. The time the switch
        takes is not counted in the next trial (call `restarted` once switched)."""
        decision = self.tuner.boundary(steps_called, self.step_times) if leader else None
        decision = broadcast(decision)
        self.step_times = []
        self.config, self.next_boundary, self.phase = (decision.config, decision.next_boundary,
                                                       decision.phase)
        return decision

    def switch(self, steps_called: int, scheduler, *, timeout_s: float, leader: bool,
               broadcast: Callable[[Any], Any], rank: int) -> SchedulerConfig | None:
        """A boundary's common part, once the adapter has finished the step's work: close
        `scheduler` (the leader tells the followers to stop following, so the decision can
        travel on the control group), decide (`decide`), and return the new setting, or None
        when it stays."""
        scheduler.close(timeout_s=timeout_s)
        scheduler.raise_if_failed()
        before = self.config
        decision = self.decide(steps_called, leader=leader, broadcast=broadcast)
        if decision.config == before:
            return None
        log.info("[rank %d] legato tuner (%s): %s", rank, decision.phase,
                 decision.config.describe())
        return decision.config

    def restarted(self) -> None:
        """The switch is done: the next step's time counts from now."""
        self._last = time.perf_counter()

    @property
    def tuning(self) -> bool:
        return self.phase in ("tuning", "confirming")

    def summary(self) -> dict[str, Any]:
        return self.tuner.summary()


# [Note: measured defaults] TensorFlow and MXNet have no start-up simulator (their forward runs
# inside graphs or MXNet's asynchronous engine, so legato cannot time each layer); their
# `defaults="fixed-or-plain"` measures instead: a 4-trial tuning round (the fixed sizes, plain,
# then one confirmation pair of the two, and up to 2 more pairs while the interval straddles
# the margin) decides with the tuner's own rule ([Note: a decision noise cannot flip]), and no
# drift checks follow. It samples nothing, so it runs without optuna.
MEASURED_DEFAULTS = TuneSettings(trials=4, steps_per_trial=8, warmup_steps=2, check_every=0,
                                 max_confirm_pairs=2)


def fixed_reason(policy: str, partition_bytes: int | None, credit_bytes: int | None,
                 tune: TuneSettings | None) -> str | None:
    """Why the defaults' check (simulated or measured) cannot choose here, or None: the
    adapters' `defaults="auto"` is "fixed" then, and "fixed-or-plain" is refused with it."""
    given = [n for n, v in (("partition_bytes", partition_bytes),
                            ("credit_bytes", credit_bytes)) if v is not None]
    return ("policy is not 'bytescheduler'" if policy != "bytescheduler"
            else f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} given" if given
            else "tune is on" if tune is not None else None)


def measured_defaults(mode: str, *, policy: str, partition_bytes: int | None,
                      credit_bytes: int | None, tune: TuneSettings | None,
                      adapter: str) -> TuneSettings | None:
    """`defaults` of the TensorFlow and MXNet wrappers: "auto" (the default) is
    "fixed-or-plain" unless a policy other than bytescheduler, a partition or credit size, or
    a tuner is given; then "fixed". Returns the tuning round that decides ([Note: measured
    defaults]), or None for the fixed sizes."""
    why = fixed_reason(policy, partition_bytes, credit_bytes, tune)
    if mode not in ("auto", "fixed", "fixed-or-plain"):
        raise ConfigError(f"defaults={mode!r} is unknown for {adapter}; pass 'auto' (the "
                          "default), 'fixed' (the fixed sizes) or 'fixed-or-plain' (the fixed "
                          "sizes or plain, whichever the first steps measure faster); "
                          "'simulated' is PyTorch's")
    if mode == "fixed-or-plain" and why:
        raise ConfigError(f"defaults='fixed-or-plain' measures the fixed sizes against plain in "
                          f"the first steps, but {why}; drop one of them")
    if mode == "fixed" or why:
        return None
    return MEASURED_DEFAULTS


def wrapper_settings(settings: dict[str, Any], adapter: str, *,
                     plain_merge_bytes: int | None = None
                     ) -> tuple[SchedulerConfig, TuneSettings | None, str]:
    """The TensorFlow and MXNet wrappers' scheduling settings (`adapter_settings`' output)
    resolved and checked: the setting to start with, the tuning round to run (the user's
    `tune`, or the defaults' check, [Note: measured defaults]), and the defaults' mode.
    `plain_merge_bytes`: the adapter's bucket size for policy="plain" when none is given."""
    policy = settings["policy"]
    merge = settings["merge_bytes"]
    if policy == "plain" and merge is None:
        merge = plain_merge_bytes
    config = resolve_config(policy, partition_bytes=settings["partition_bytes"],
                            credit_bytes=settings["credit_bytes"], merge_bytes=merge)
    tune = TuneSettings.from_arg(settings["tune"])
    if tune is not None and config.policy != "bytescheduler":
        raise ConfigError(f"tune=True searches bytescheduler's partition and credit sizes; "
                          f"policy={policy!r} has none: use policy='bytescheduler'")
    check = measured_defaults(settings["defaults"], policy=config.policy,
                              partition_bytes=settings["partition_bytes"],
                              credit_bytes=settings["credit_bytes"], tune=tune,
                              adapter=adapter)
    return config, tune or check, "fixed" if check is None else "fixed-or-plain"
