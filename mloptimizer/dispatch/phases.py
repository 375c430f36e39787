"""The phases of a search: explore, then refine, then the end.

*Explore* samples ``budget.maxTrials`` architectures with ``training.epochs``; *refine*
retrains the ``training.refine.topK`` best for ``refine.epochs``; the search then ends with
an :class:`Outcome` saying what it found. These rules decide from the counts and paces the
ledger keeps; the loop acts on them. A new rule about when a phase opens or closes goes
here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import optuna

from mloptimizer.dispatch import judgements
from mloptimizer.dispatch.contract import Counts, Outcome
from mloptimizer.dispatch.ledger import InFlight, Ledger, epoch_pace, fixed_seconds
from mloptimizer.sizing import ModelSize
from mloptimizer.spec import ArchitectureSearchSpec, parse_duration
from mloptimizer.study import Attr, TrialRecord, best_of, pareto_front, records

__all__ = [
    "RECENT_TRIALS",
    "UNSEEN_FAMILY_MARGIN",
    "Phases",
    "end_outcome",
    "epoch_seconds_at",
    "epoch_seconds_of",
    "exploration_closes",
    "fixed_seconds_of",
    "refine_fits",
    "refine_ranked",
    "refine_seconds",
]

log = logging.getLogger(__name__)


class Phases(Ledger):
    """The ledger under the phase rules: how many trials to ask for, when exploration
    closes, when refine opens, how the search ends."""

    def __init__(
        self, study: optuna.Study, spec: ArchitectureSearchSpec, clock: Callable[[], float]
    ) -> None:
        super().__init__(study, spec, clock)
        self.explore_closed: str | None = None  # why exploration closed early for refine
        self._started_at: float | None = None  # the study's start (Unix time)
        self._late_in_a_row = 0  # explore trials sampled in a row that would end too late

    def _explore_left(self) -> int:
        return self.spec.budget.max_trials - self.counts.explore_used

    def _fresh_to_ask(self) -> int:
        """How many new trials the next fill asks for (enqueued ones go first)."""
        free = self.spec.budget.parallelism - len(self.in_flight) - self.waiting
        # the timeout's rule is looked at on every pass of the loop, not only when a slot
        # frees: a slow trial in flight must not carry the search past the moment to close
        if self.refine_started or self._time_for_refine() or free <= 0:
            return 0
        return min(free, self._explore_left())

    def _time_for_refine(self) -> bool:
        """Whether exploring on would leave too little of ``budget.timeout`` for refine
        (:func:`~mloptimizer.dispatch.phases.exploration_closes`); once true, it stays."""
        if self.explore_closed is None:
            self.explore_closed = exploration_closes(
                self.spec,
                self._epoch_seconds,
                self._refine_paces(),
                self._elapsed,
                self.counts.explore_used,
                [fixed or 0.0 for _, fixed in self._fixed_seconds],
            )
            if self.explore_closed is not None:
                log.info("%s", self.explore_closed)
        return self.explore_closed is not None

    def _held_back(
        self,
        trial: optuna.trial.Trial,
        rec: TrialRecord,
        size: ModelSize,
        memory_budget: int | None,
    ) -> bool:
        """Whether a trial just sampled is failed unsent: its model cannot fit a trainer's
        ``memory_budget`` (``too_large``), or it would end too late (:meth:`_too_late`)."""
        too_large = judgements.too_large(size, self.spec.training.batch_size, memory_budget)
        if too_large is not None:
            self._fail_unsent(trial, rec, too_large)
            return True
        return self._too_late(trial, rec, size.mflops)

    def _too_late(self, trial: optuna.trial.Trial, rec: TrialRecord, mflops: float) -> bool:
        """Whether an explore trial just sampled would end after refine must start under
        ``budget.timeout``, at the pace of the trials of its family and size that trained
        (:func:`epoch_seconds_of`), plus what they took beyond their epochs
        (:func:`fixed_seconds_of`): it is then not sent, and uses no budget. A start-up
        trial need only leave time for the cheapest refine, not the best's: a slow random
        best must not starve the start-up (bench/vs_peers.py seed 5 explored 3 trials). A
        trial can only be stopped at an epoch's end, so one sent with too little time would
        hold a trainer past the moment refine needs it. When no refine fits any more, a
        trial is late only when the timeout itself would cut it. After
        :data:`RECENT_TRIALS` such samples in a row, exploration closes."""
        timeout = self.spec.budget.timeout
        if rec.phase != "explore" or timeout is None or self.spec.training.refine is None:
            return False
        left, needs = self._left_and_refine()
        if self._start_up():
            # the best so far is one of a few random ones, worth less than exploring on: a
            # start-up trial need only leave the cheapest refine room
            cheapest = [_refine_time(self.spec, p, f) for _, p, f in self._refine_paces()]
            needs = min([c for c in cheapest if c <= left], default=needs)
        # When no refine fits any more, a trial is late only if the timeout itself would
        # cut it, at its own family's pace without the margin a family none trained yet is
        # given: there is no refine left to protect, and a sample held back wrongly ends
        # the search early (a family none trained is sent). Sent, it would hold its trainer
        # past the timeout (a simulated-clock search ran 36 s over its 5 minutes so).
        cut = math.isinf(needs)
        per_epoch = (
            epoch_seconds_at(mflops, [(m, s) for f, m, s in self._size_pace if f == rec.family])
            if cut
            else epoch_seconds_of(rec.family, mflops, self._size_pace)
        )
        fixed = fixed_seconds_of(rec.family, self._fixed_seconds)
        room = left if cut else left - needs
        takes = (per_epoch or 0.0) * self.spec.training.epochs + fixed
        if per_epoch is None or takes <= room:
            self._late_in_a_row = 0
            return False
        if cut:
            why = f"budget.timeout ends in {max(0.0, left):.0f} s and no refine fits in it"
            each = "would each end after budget.timeout, and no refine fits in it"
        else:
            why = f"refine must start in {max(0.0, room):.0f} s"
            each = (
                f"would each end after refine must start ({needs:.0f} s for the top "
                f"{self.spec.training.refine.top_k})"
            )
        self._late_in_a_row += 1
        self._fail_unsent(
            trial,
            rec,
            f"late: about {takes:.0f} s ({self.spec.training.epochs} epochs of a "
            f"{mflops:.3g}-MFLOPs model at the pace of "
            f"{_pace_basis(rec.family, self._size_pace)}, and {fixed:.0f} s beyond its "
            f"epochs); {why}",
            late=True,
        )
        if self._late_in_a_row >= RECENT_TRIALS and self.explore_closed is None:
            self.explore_closed = (
                f"exploration closed at {self._elapsed():.0f} s of budget.timeout {timeout}: "
                f"the last {RECENT_TRIALS} trials sampled {each}"
            )
            log.info("%s", self.explore_closed)
        return True

    def _start_up(self) -> bool:
        """Whether the explore trial being judged is one of the sampler's start-up trials
        (it was counted when asked for)."""
        return self.counts.explore_used <= self.spec.sampler.n_startup_trials

    def _outlasts_refine(self, flight: InFlight, epoch: int) -> bool:
        """Whether an explore trial still training after exploration closed would end too
        late to leave refine its time (:func:`refine_seconds`); it is then stopped, as
        pruned, at this epoch. Judged at its own pace so far, epoch by epoch, plus what its
        family's trials took beyond their epochs (:func:`fixed_seconds_of`): its teardown
        is still to come, and its start-up is in its pace so far, so this errs long."""
        if self.explore_closed is None or self.refine_started or epoch <= 0:
            return False
        if flight.message.phase != "explore" or self.spec.budget.timeout is None:
            return False
        began = flight.taken_at if flight.taken_at is not None else flight.sent_at
        finishing = (flight.message.epochs - epoch) * (self.clock() - began) / epoch
        finishing += fixed_seconds_of(flight.record.family, self._fixed_seconds)
        left, needs = self._left_and_refine()
        if finishing <= left - needs or math.isinf(needs):  # nothing to make room for
            return False
        log.info(
            "trial %d stopped at epoch %d: its %d epochs left (about %.0f s) would leave "
            "refine less than the %.0f s it needs",
            flight.message.number,
            epoch,
            flight.message.epochs - epoch,
            finishing,
            needs,
        )
        return True

    def _next_phase(self) -> bool:
        """After exploration, enqueue the refine trials once; False when nothing is left."""
        refine = self.spec.training.refine
        if self.waiting > 0:
            return True
        if refine is None or self.refine_started:
            return False
        explored = [r for r in records(self.study) if r.phase == "explore"]
        if self.spec.budget.timeout is not None:
            explored = self._fitting(explored)
        ranked = refine_ranked(self.spec, explored, self._direction)
        if not ranked:
            return False
        for rec in ranked:
            attrs = {Attr.PHASE: "refine", Attr.REFINES: rec.number}
            self.study.enqueue_trial(rec.params, user_attrs=attrs)
            self.waiting += 1
        self.refine_started = True
        log.info(
            "refine: retraining the top %d%s for %d epochs",
            len(ranked),
            " of the Pareto front" if self.spec.objective.tradeoff else "",
            refine.epochs,
        )
        return True

    def _fitting(self, explored: list[TrialRecord]) -> list[TrialRecord]:
        """The explored trials whose refine ends within ``budget.timeout``: a best that
        turned out slow late in the search gives way to the best that fits, rather than
        start a retraining the timeout would cut."""
        assert self.spec.budget.timeout is not None
        left = parse_duration(self.spec.budget.timeout) - self._elapsed()
        fitting = [r for r in explored if refine_fits(self.spec, r, left, self._fixed_seconds)]
        best, kept = best_of(explored, self._direction), best_of(fitting, self._direction)
        if best is not None and (kept is None or kept.number != best.number):
            log.info(
                "refine: trial %d, the best, would not end within the %.0f s left of "
                "budget.timeout; refining %s",
                best.number,
                left,
                f"the best that fit (trial {kept.number} first)" if kept else "none",
            )
        return fitting

    def _left_and_refine(self) -> tuple[float, float]:
        """Seconds of ``budget.timeout`` left, and what refine needs of them
        (:func:`refine_seconds`, infinite when no refine fits)."""
        assert self.spec.budget.timeout is not None
        left = parse_duration(self.spec.budget.timeout) - self._elapsed()
        return left, refine_seconds(self.spec, self._epoch_seconds, self._refine_paces(), left)

    def _refine_paces(self) -> list[tuple[float, float, float]]:
        """(value, seconds per epoch, seconds beyond the epochs) of the complete feasible
        explored trials, as refine would retrain them: beyond its epochs, a trial is given
        the most of its own and its family's recent ones (:func:`fixed_seconds_of`), for
        that time varies from trial to trial of one model (an Inception model's first epoch's
        tracing) and refine must not be started on a lucky one."""
        families = {family for *_, family in self._explored_pace}
        most = {family: fixed_seconds_of(family, self._fixed_seconds) for family in families}
        return [
            (value, pace, max(fixed, most[family]))
            for value, pace, fixed, family in self._explored_pace
        ]

    def _elapsed(self) -> float:
        """Seconds since the study began (its creation, whichever dispatcher made it)."""
        if self._started_at is None:  # read once: set when the study was made, never after
            self._started_at = float(self.study.user_attrs.get(Attr.STARTED_AT, self.clock()))
        return self.clock() - self._started_at

    def _end(self) -> Outcome:
        return end_outcome(self.spec, self.counts, self.explore_closed)


# The next explore trial is judged as slow as the slowest of the last few: one longer than
# the median would otherwise carry the search past the point where refine still fits.
RECENT_TRIALS = 5


def epoch_seconds_at(mflops: float, trained: list[tuple[float, float]]) -> float | None:
    """Seconds an epoch of a model of ``mflops`` is likely to take, from (MFLOPs, seconds
    per epoch) of the trials that trained: between the two of nearest size, on the line
    through them; beyond the largest, in proportion to it (an epoch's time is a fixed
    cost plus one per multiply-add, so this errs long, never short); below the smallest,
    by the square root of the ratio, halfway (on a log scale) between its time and in
    proportion: the fixed cost is not known. None before any trained."""
    points = sorted((m, sec) for m, sec in trained if m > 0 and sec > 0)
    if not points or mflops <= 0:
        return None
    if mflops >= points[-1][0]:
        return points[-1][1] * mflops / points[-1][0]
    if mflops <= points[0][0]:
        return points[0][1] * math.sqrt(mflops / points[0][0])
    above = next(i for i, (m, _) in enumerate(points) if m >= mflops)
    (m0, s0), (m1, s1) = points[above - 1], points[above]
    return s0 + (s1 - s0) * (mflops - m0) / (m1 - m0) if m1 > m0 else s1


# An architecture family no trial of the search has trained yet is estimated at this many
# times the others' pace: an epoch's cost per multiply-add differs by family (an Inception
# module's many small convolutions and its concatenation cost more per multiply-add than a
# plain convolution), and an estimate that errs short holds the trainer refine needs.
UNSEEN_FAMILY_MARGIN = 2.0


def epoch_seconds_of(
    family: str | None, mflops: float, trained: list[tuple[str | None, float, float]]
) -> float | None:
    """:func:`epoch_seconds_at` from the trials of the same architecture ``family`` that
    trained (family, MFLOPs, seconds per epoch); for a family none of them is of, from all
    of them times :data:`UNSEEN_FAMILY_MARGIN`."""
    same = [(m, sec) for f, m, sec in trained if f == family]
    if same:
        return epoch_seconds_at(mflops, same)
    estimate = epoch_seconds_at(mflops, [(m, sec) for _, m, sec in trained])
    return None if estimate is None else estimate * UNSEEN_FAMILY_MARGIN


def _pace_basis(family: str | None, trained: list[tuple[str | None, float, float]]) -> str:
    """Whose pace :func:`epoch_seconds_of` read, for the ``late`` reason."""
    if family is None or any(f == family for f, _, _ in trained):
        return "those of its family that trained" if family else "those that trained"
    return f"those that trained, times {UNSEEN_FAMILY_MARGIN:g}: no {family} trained yet"


def fixed_seconds_of(
    family: str | None, measured: Sequence[tuple[str | None, float | None]]
) -> float:
    """Seconds a trial of architecture ``family`` is likely to take beyond its epochs
    (:meth:`~mloptimizer.dispatch.ledger.InFlight.fixed_seconds`), from (family, seconds)
    of the explored trials that trained (None: not measured, as a trainer's first trial is
    not): the most of the last :data:`RECENT_TRIALS` of its family; for a family whose
    only trained trials went unmeasured, the most of the last of all; for a family none
    of them is of, that times :data:`UNSEEN_FAMILY_MARGIN`. 0 before any trained.

    A family that trained is known to train: bench/vs_peers.py seed 2's first trial, a
    CNN and its trainer's first, went unmeasured, and twice the Inception trials' 28 s
    then judged every CNN sampled after them late, which closed exploration at 4 trials."""
    trained = [sec for f, sec in measured if f == family]
    same = [sec for sec in trained if sec is not None][-RECENT_TRIALS:]
    if same:
        return max(same)
    others = max([sec for _, sec in measured if sec is not None][-RECENT_TRIALS:], default=0.0)
    return others if trained else others * UNSEEN_FAMILY_MARGIN


def _refine_waves(spec: ArchitectureSearchSpec) -> int:
    """How many trials of refine run one after the other: ``topK`` in waves of
    ``parallelism``."""
    refine = spec.training.refine
    assert refine is not None
    return math.ceil(refine.top_k / spec.budget.parallelism)


def _refine_time(spec: ArchitectureSearchSpec, pace: float, fixed: float) -> float:
    """Refine's seconds for trials whose epochs take ``pace`` and that take ``fixed`` more
    beyond them (once a trial, whatever its epochs): ``refine.epochs`` each, in waves."""
    refine = spec.training.refine
    assert refine is not None
    return (refine.epochs * pace + fixed) * _refine_waves(spec)


def refine_fits(
    spec: ArchitectureSearchSpec,
    rec: TrialRecord,
    left: float,
    measured: Sequence[tuple[str | None, float | None]] = (),
) -> bool:
    """Whether retraining ``rec`` for refine, at the pace it explored and with the most of
    what it and its family's recent trials took beyond their epochs (``measured``: family,
    seconds, :func:`fixed_seconds_of`), ends within ``left`` seconds (a trial whose pace is
    unknown is given the benefit of the doubt)."""
    pace = epoch_pace(rec)
    beyond = max(fixed_seconds(rec) or 0.0, fixed_seconds_of(rec.family, measured))
    return pace is None or _refine_time(spec, pace, beyond) <= left


def refine_seconds(
    spec: ArchitectureSearchSpec,
    epoch_seconds: list[float],
    explored_pace: list[tuple[float, float, float]],
    left: float | None = None,
) -> float:
    """The refine trials' estimated time: ``topK`` trials of ``refine.epochs``, in waves of
    ``parallelism``, each at the pace its explored trial trained and with what that took
    beyond its epochs, the slowest of the current top ``topK``. With ``left`` (seconds of
    ``budget.timeout`` left), the top ``topK`` of the trials whose refine fits in it, as
    the refine phase would choose them (:meth:`Phases._fitting`); infinite when none does.

    ``explored_pace``: (value, seconds per epoch, seconds beyond the epochs) of the
    complete feasible explored trials."""
    refine = spec.training.refine
    assert refine is not None
    sign = -1.0 if spec.objective.study_direction == "maximize" else 1.0
    if left is not None:
        explored_pace = [p for p in explored_pace if _refine_time(spec, p[1], p[2]) <= left]
        if not explored_pace:
            return math.inf
    top = sorted(explored_pace, key=lambda p: sign * p[0])[: refine.top_k]
    if not top:
        return _refine_time(spec, max(epoch_seconds, default=0.0), 0.0)
    return max(_refine_time(spec, pace, fixed) for _, pace, fixed in top)


def exploration_closes(
    spec: ArchitectureSearchSpec,
    epoch_seconds: list[float],
    explored_pace: list[tuple[float, float, float]],
    elapsed: Callable[[], float],
    asked: int,
    fixed: list[float] | None = None,
) -> str | None:
    """Why exploring on would leave too little of ``budget.timeout`` for refine, or None.

    The refine phase is what turns the explored best into the model delivered, so under
    a timeout exploration closes early enough for it: when the time left is no more than
    the refine trials' estimated time (:func:`refine_seconds`) plus one more explore
    trial's, estimated pessimistically (the slowest of the last :data:`RECENT_TRIALS`, by
    its pace and what it took beyond its epochs): a trial started just before closing
    must end in time. An
    explore trial in flight that would still end too late is stopped
    (:meth:`Phases._outlasts_refine`), and one sampled that would is not sent
    (:meth:`Phases._too_late`). Never before the sampler's start-up trials were asked for
    and ``topK`` completed: refining the best of a few random trials is worth less than
    exploring; but a slow start-up trial still training must not keep refine out. The
    refine trials counted are the best whose retraining fits in the time left (a slow
    model that became the best late gives way to the best that fits); when none fits any
    more, the search explores on, sending only trials that end before the timeout.

    ``epoch_seconds``: seconds per epoch of the explored trials that trained, in the
    order they ended; ``explored_pace``: (value, seconds per epoch, seconds beyond the
    epochs) of the complete feasible ones; ``elapsed``: seconds since the study began;
    ``asked``: explore trials asked of the sampler; ``fixed``: the seconds beyond their
    epochs of the trials of ``epoch_seconds``, in the same order (None: not measured).
    """
    refine, timeout = spec.training.refine, spec.budget.timeout
    if refine is None or timeout is None or not epoch_seconds:
        return None
    if len(explored_pace) < refine.top_k or asked < spec.sampler.n_startup_trials:
        return None  # too little explored for a best worth refining: explore on
    beyond = fixed if fixed is not None else [0.0] * len(epoch_seconds)
    recent = list(zip(epoch_seconds, beyond, strict=True))[-RECENT_TRIALS:]
    next_trial = max(pace * spec.training.epochs + extra for pace, extra in recent)
    left = parse_duration(timeout) - elapsed()
    refine_needs = refine_seconds(spec, epoch_seconds, explored_pace, left)
    reserve = refine_needs + next_trial
    if left > reserve or math.isinf(refine_needs):
        return None  # time to explore more; or no refine fits any more: explore on
    return (
        f"exploration closed at {elapsed():.0f} s of budget.timeout {timeout} to "
        f"leave about {reserve:.0f} s for refine ({refine_needs:.0f} s for the top "
        f"{refine.top_k}, {next_trial:.0f} s for a trial in flight)"
    )


def refine_ranked(
    spec: ArchitectureSearchSpec,
    explored: list[TrialRecord],
    direction: Literal["maximize", "minimize"],
) -> list[TrialRecord]:
    """The explored trials to refine, best first: the ``topK`` best (the earliest of equal
    values first), or under a tradeoff the Pareto front's most accurate members."""
    refine = spec.training.refine
    assert refine is not None
    tradeoff = spec.objective.tradeoff
    if tradeoff:
        return pareto_front(explored, direction, tradeoff)[: refine.top_k]
    left = list(explored)
    ranked: list[TrialRecord] = []
    while len(ranked) < refine.top_k and (best := best_of(left, direction)):
        ranked.append(best)
        left.remove(best)
    return ranked


def end_outcome(
    spec: ArchitectureSearchSpec, counts: Counts, explore_closed: str | None
) -> Outcome:
    """How a search that ran out of trials ends: what it explored and its best trial.

    ``explore_closed`` (why exploration closed early for refine) makes it a timeout.
    """
    c, metric = counts, spec.objective.metric
    if explore_closed is not None:  # refine done within budget.timeout
        best = (
            f"best trial {c.best.number}: {metric} {c.best.value:.4f}"
            if c.best is not None and c.best.value is not None
            else "no trial completed"
        )
        # a refine trial can still be cut, by an explore trial that outlasted its estimate
        refined = any(r.phase == "refine" and r.state == "complete" for r in c.history)
        then = "then refined within" if refined else "then no refine ended within"
        return Outcome(
            "timeout",
            f"{c.explore_used} trials explored, {then} budget.timeout "
            f"{spec.budget.timeout}; {best}",
            failed=False,
        )
    best = (
        f"best trial {c.best.number}: {metric} {c.best.value:.4f}"
        if c.best is not None and c.best.value is not None
        else "no feasible trial completed"
        if c.infeasible
        else "no trial completed"
    )
    return Outcome("maxTrials", f"{c.explore_used} trials explored; {best}", failed=False)
