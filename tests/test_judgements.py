"""The dispatch loop's pure judgements, alone: no study, no broker, no database.

Each verdict the loop acts on (a message refused, a model too large or over a device
constraint, the values told, a budget limit met, when exploration closes, what refine
retrains, which trials are overdue) is judged here from plain values.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from dispatch import make_spec, progress_of, result_of

from mloptimizer.capability import new_token
from mloptimizer.dispatch import Counts, DeadTrial, trial_message
from mloptimizer.dispatch.deadlines import Deadlines
from mloptimizer.dispatch.judgements import (
    EarlierAttempts,
    budget_stop,
    claim_of,
    objective_values,
    reached,
    refusal,
    result_attrs,
    too_large,
    violations,
    worst_value,
)
from mloptimizer.dispatch.ledger import InFlight, epoch_pace, fixed_seconds
from mloptimizer.dispatch.phases import (
    RECENT_TRIALS,
    UNSEEN_FAMILY_MARGIN,
    end_outcome,
    epoch_seconds_at,
    epoch_seconds_of,
    exploration_closes,
    fixed_seconds_of,
    refine_fits,
    refine_ranked,
    refine_seconds,
)
from mloptimizer.messages import TrialMessage
from mloptimizer.sizing import ModelSize, memory_bytes
from mloptimizer.space import sample_architecture
from mloptimizer.spec import ArchitectureSearchSpec, Constraints
from mloptimizer.study import Attr, TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCH = "ns.search"


def sent(number: int = 4, trial_id: int = 40, phase: str = "explore") -> TrialMessage:
    """What the loop sent for a trial (an in-memory study samples its architecture)."""
    spec = make_spec(training={"refine": {"topK": 1, "epochs": 5}})
    architecture = sample_architecture(optuna.create_study().ask(), spec.search_space)
    return trial_message(
        spec,
        search=SEARCH,
        number=number,
        trial_id=trial_id,
        phase=phase,  # type: ignore[arg-type]
        architecture=architecture,
    )


def rec(number: int, value: float | None, **changes: Any) -> TrialRecord:
    fields: dict[str, Any] = {
        "number": number,
        "trial_id": 100 + number,
        "phase": "explore",
        "state": "complete",
        "value": value,
        "architecture": None,
        "params": {"n": number},
        "interrupted": False,
        "refines": None,
        "error": None,
        "seconds": 0.0,
        "cost_usd": 0.0,
        "attrs": {},
    }
    return TrialRecord(**{**fields, **changes})


# --- refusals of a received message ----------------------------------------------------

TOKENLESS = "it does not carry trial 4's token: only the trainer that received the trial"


def test_a_message_about_the_trial_sent_is_accepted() -> None:
    trial = sent()
    last_epoch = progress_of(trial, epoch=trial.epochs)
    for message in (progress_of(trial), last_epoch, result_of(trial), DeadTrial(trial, "gave up")):
        assert refusal(message, search=SEARCH, sent=trial, told=False) is None


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda t: result_of(t, search="ns.attacker"), "it claims search 'ns.attacker', not"),
        (lambda t: result_of(t, number=t.number + 7), "trial id 40 is trial 4, not 11"),
        (lambda t: result_of(t, phase="refine"), "a refine result for a explore trial"),
        (lambda t: result_of(t, epochs_run=t.epochs + 1), "more epochs than the trial's 3"),
        (
            lambda t: result_of(t, epochs_run=2, resumed_at=3),
            "resumed_at: 3 is past epochs_run 2",
        ),
        (
            lambda t: result_of(t, history=[{"val_accuracy": 0.5}] * (t.epochs + 1)),
            "more epochs than the trial's 3",
        ),
        (lambda t: progress_of(t, epoch=t.epochs + 1), "epoch 4 of a trial of 3 epochs"),
        (lambda t: progress_of(t, search="other.search"), "it claims search 'other.search'"),
        (
            lambda t: DeadTrial(t.model_copy(update={"search": "x.y"}), "r"),
            "it claims search 'x.y'",
        ),
        # a trial is a capability: right search, id, number and epochs are not enough
        (lambda t: result_of(t, token=new_token()), TOKENLESS),
        (lambda t: progress_of(t, token=new_token()), TOKENLESS),
        (lambda t: DeadTrial(t.model_copy(update={"token": new_token()}), "oom"), TOKENLESS),
        (lambda t: result_of(t, value=1.5), "value: 1.5 is out of range for val_accuracy"),
        (lambda t: result_of(t, value=-0.1), "value: -0.1 is out of range for val_accuracy"),
    ],
)
def test_a_message_not_matching_the_trial_sent_is_refused(forge: Any, reason: str) -> None:
    trial = sent()
    why = refusal(forge(trial), search=SEARCH, sent=trial, told=False)
    assert why is not None
    assert why.startswith(reason)


def test_a_message_about_no_trial_in_flight_is_refused_unless_that_trial_was_told() -> None:
    trial = sent()
    message = result_of(trial)
    why = refusal(message, search=SEARCH, sent=None, told=False)
    assert why == "no trial with id 40 is in flight in this search"
    # a copy of a finished trial is not refused: the loop drops it (or answers prune)
    assert refusal(message, search=SEARCH, sent=None, told=True) is None


def test_the_claim_of_a_dead_lettered_trial_is_the_trial_sent() -> None:
    trial = sent()
    assert claim_of(DeadTrial(trial, "gave up")) is trial
    message = progress_of(trial)
    assert claim_of(message) is message


# --- models judged before training ---------------------------------------------------


def test_a_model_too_large_for_the_memory_budget_says_by_how_much_and_what_to_do() -> None:
    size = ModelSize(parameters=50_000_000, activations=100_000)
    need = memory_bytes(size, 32)
    assert too_large(size, 32, None) is None
    assert too_large(size, 32, need) is None  # exactly fits
    why = too_large(size, 32, need - 1)
    assert why is not None
    assert why.startswith("too_large: 50.0 M parameters")
    assert "batches of 32" in why
    assert "narrow the search space or raise the memory" in why


def test_no_constraints_judge_nothing() -> None:
    assert violations(None, 10**9, 1e6, 1e6, trained=True) == ({}, None)


def test_constraints_give_each_excess_and_why_the_model_breaks_them() -> None:
    limits = Constraints.model_validate({"maxParams": 1000, "maxMFLOPs": 2.0})
    excess, why = violations(limits, 1500, 1.5, None, trained=True)
    assert excess == {"params": 500.0, "mflops": -0.5}
    assert why == "params 1,500 > maxParams 1,000"
    excess, why = violations(limits, 800, 3.0, None, trained=True)
    assert excess == {"params": -200.0, "mflops": 1.0}
    assert why == "mflops 3 > maxMFLOPs 2"


def test_before_training_only_a_model_whose_weights_alone_break_max_model_kb_is_judged() -> None:
    limits = Constraints.model_validate({"maxModelKB": 10.0})
    # 20,480 weights are at least 20 KB as int8: over the limit whatever the converter does
    excess, why = violations(limits, 20_480, None, None, trained=False)
    assert excess == {"model_kb": 10.0}
    assert why == "model_kb >= 20 (a byte per weight) > maxModelKB 10"
    # 5,120 weights may fit: not judged until measured
    assert violations(limits, 5_120, None, None, trained=False) == ({"model_kb": 0.0}, None)


def test_after_training_a_size_not_measured_breaks_its_constraint() -> None:
    limits = Constraints.model_validate({"maxModelKB": 10.0, "maxMFLOPs": 5.0})
    excess, why = violations(limits, 100, None, None, trained=True)
    assert excess == {"mflops": 1.0, "model_kb": 1.0}
    assert why == "mflops not measured (maxMFLOPs 5); model_kb not measured (maxModelKB 10)"
    # a pruned trial (not trained to the end) is not blamed for a missing measure
    assert violations(limits, 100, None, None, trained=False)[1] is None


# --- what the study is told ----------------------------------------------------------


def test_the_values_told_are_the_value_and_under_a_tradeoff_the_size_figure() -> None:
    assert objective_values(None, 0.9, 100, 1.0, 2.0) == 0.9
    assert objective_values("params", 0.9, 100, 1.0, 2.0) == [0.9, 100.0]
    assert objective_values("mflops", 0.9, 100, 1.0, 2.0) == [0.9, 1.0]
    assert objective_values("modelKB", 0.9, 100, 1.0, 2.0) == [0.9, 2.0]
    assert objective_values("modelKB", 0.9, 100, 1.0, None) is None  # not measured
    assert objective_values("costUSD", 0.9, 100, 1.0, 2.0, 0.25) == [0.9, 0.25]
    assert objective_values("params", None, 100, 1.0, 2.0) is None


def test_an_infeasible_trial_is_told_the_worst_value() -> None:
    assert worst_value("maximize") == 0.0
    assert worst_value("minimize") == 1e9


def test_a_result_writes_who_trained_it_how_long_what_it_cost_and_its_error() -> None:
    trial = sent()
    message = result_of(trial, train_seconds=3000.0, dataset_load_seconds=600.0, device="GPU")
    attrs = result_attrs(message, 2.0, "val_accuracy")
    assert attrs[Attr.SECONDS] == 3600.0
    assert attrs[Attr.COST] == pytest.approx(2.0)
    assert attrs[Attr.DEVICE] == "GPU"
    assert Attr.ERROR not in attrs
    failed = result_attrs(result_of(trial, state="failed", error="OOM"), 0.0, "val_accuracy")
    assert failed[Attr.ERROR] == "OOM"
    silent = result_attrs(result_of(trial, value=None), 0.0, "val_loss")
    assert silent[Attr.ERROR] == "the trainer sent no val_loss"
    assert Attr.RESUMED_AT not in attrs  # trained from the start
    assert Attr.REDONE_USD not in attrs
    assert Attr.SAVED_USD not in attrs
    resumed = result_attrs(result_of(trial, epochs_run=3, resumed_at=2), 0.0, "val_accuracy")
    assert resumed[Attr.RESUMED_AT] == 2  # the trial keeps what its last attempt restored


# --- budget ------------------------------------------------------------------------------


def test_a_target_is_reached_in_the_objective_direction() -> None:
    assert reached("maximize", 0.9, rec(1, 0.9))
    assert not reached("maximize", 0.9, rec(1, 0.89))
    assert reached("minimize", 0.1, rec(1, 0.05))
    assert not reached("minimize", 0.1, rec(1, 0.2))


def test_budget_limits_end_the_search_in_order_and_the_clock_is_read_only_for_a_timeout() -> None:
    spec = make_spec(
        budget={"maxFailedTrials": 2, "timeout": "1m", "maxCostUSD": 1.0},
        objective={"target": 0.95},
    )
    asked: list[bool] = []

    def elapsed() -> float:
        asked.append(True)
        return 10.0

    assert budget_stop(spec, Counts(), elapsed) is None
    failed = budget_stop(spec, Counts(failed=2, best=rec(3, 0.99)), elapsed)
    assert failed is not None
    assert (failed.reason, failed.failed) == ("maxFailedTrials", True)
    assert failed.message == "2 trials failed (budget.maxFailedTrials 2)"
    target = budget_stop(spec, Counts(best=rec(3, 0.99), cost_usd=5.0), elapsed)
    assert target is not None
    assert (target.reason, target.failed) == ("target", False)
    assert target.message == "trial 3 reached val_accuracy 0.9900 (objective.target 0.95)"
    cost = budget_stop(spec, Counts(cost_usd=1.0), elapsed)
    assert cost is not None
    assert cost.message == "spent $1.00 of budget.maxCostUSD $1.00"
    timeout = budget_stop(spec, Counts(cost_usd=5.0), lambda: 60.0)
    assert timeout is not None
    assert timeout.message == "budget.timeout 1m has passed"
    asked.clear()
    budget_stop(make_spec(), Counts(), elapsed)
    assert asked == []  # no timeout set: the study's start is never read


def test_zero_max_failed_trials_stops_at_the_first_failure() -> None:
    spec = make_spec(budget={"maxFailedTrials": 0})
    assert budget_stop(spec, Counts(), lambda: 0.0) is None
    stop = budget_stop(spec, Counts(failed=1), lambda: 0.0)
    assert stop is not None
    assert stop.reason == "maxFailedTrials"


# --- phases --------------------------------------------------------------------------------


def refine_spec(**budget: Any) -> ArchitectureSearchSpec:
    return make_spec(
        budget={"maxTrials": 20, "parallelism": 2, "timeout": "10m", **budget},
        training={"epochs": 3, "refine": {"topK": 2, "epochs": 6}},
    )


def test_exploration_closes_when_the_time_left_just_holds_refine() -> None:
    spec = refine_spec()
    paces = [10.0, 10.0, 10.0]
    explored = [(0.9, 10.0, 0.0), (0.8, 10.0, 0.0), (0.7, 10.0, 0.0)]
    # refine: 10 s x 6 epochs x 1 wave = 60 s; plus one explore trial, 30 s: reserve 90 s
    assert exploration_closes(spec, paces, explored, lambda: 500.0, 3) is None  # 100 s left
    why = exploration_closes(spec, paces, explored, lambda: 520.0, 3)  # 80 s left
    assert why is not None
    assert "leave about 90 s for refine" in why
    # when refine itself no longer fits, the search explores on (exploration stays open)
    assert exploration_closes(spec, paces, explored, lambda: 560.0, 3) is None  # 40 s left


def test_the_next_explore_trial_is_judged_as_slow_as_the_slowest_recent_one() -> None:
    spec = refine_spec()
    explored = [(0.9, 10.0, 0.0), (0.8, 10.0, 0.0), (0.7, 10.0, 0.0)]
    # one of the last five trained at 30 s an epoch: a trial in flight may take 90 s, so
    # the reserve is 60 s of refine + 90 s, and exploration closes at 150 s left
    paces = [50.0, 10.0, 10.0, 30.0, 10.0, 10.0, 10.0]
    assert exploration_closes(spec, paces, explored, lambda: 440.0, 3) is None  # 160 s left
    why = exploration_closes(spec, paces, explored, lambda: 460.0, 3)  # 140 s left
    assert why is not None
    assert "leave about 150 s for refine (60 s for the top 2, 90 s" in why
    assert refine_seconds(spec, paces, explored) == 60.0
    # the top trials' pace sets refine's: the best trained at 20 s an epoch
    assert refine_seconds(spec, paces, [(0.95, 20.0, 0.0), *explored]) == 120.0


def test_what_a_trial_took_beyond_its_epochs_counts_once_per_trial() -> None:
    """bench/vs_peers.py seed 5: an Inception trial's fit returned 17-29 s after its last
    epoch, and refine, estimated by its epochs alone, was cut by the timeout."""
    spec = refine_spec()
    explored = [(0.9, 10.0, 25.0), (0.8, 10.0, 0.0), (0.7, 10.0, 0.0)]
    # refine of the top 2: 6 epochs at 10 s, plus the best's 25 s beyond them, once
    assert refine_seconds(spec, [10.0] * 3, explored) == 85.0
    # the next explore trial: 3 epochs at 10 s plus the most any recent one took beyond
    paces, fixed = [10.0] * 3, [25.0, 0.0, 5.0]
    why = exploration_closes(spec, paces, explored, lambda: 600.0 - 139.0, 3, fixed)
    assert why is not None
    assert "leave about 140 s for refine (85 s for the top 2, 55 s" in why
    assert exploration_closes(spec, paces, explored, lambda: 600.0 - 141.0, 3, fixed) is None
    # a refine that fits by its epochs but not with its teardown gives way
    assert refine_seconds(spec, [10.0] * 3, explored, left=80.0) == 60.0
    assert refine_seconds(spec, [10.0] * 3, explored[:1], left=80.0) == math.inf


def test_refine_is_given_the_most_its_family_took_beyond_its_epochs() -> None:
    """An Inception model's time beyond its epochs varies (4.5-12.6 s in one search): a
    refine started on the explored trial's own lucky 0 s would be cut, so the family's
    recent most counts."""
    spec = refine_spec()  # refine: 6 epochs, one wave
    attrs = {Attr.EPOCHS: 3, Attr.EPOCH_SECONDS: 10.0, Attr.FIXED_SECONDS: 0.0}
    lucky = rec(1, 0.9, params={"family": "inception"}, attrs=attrs)
    family = [("inception", 30.0), ("cnn", 50.0)]
    assert refine_fits(spec, lucky, 85.0)  # 60 s of epochs, its own 0 s beyond
    assert not refine_fits(spec, lucky, 85.0, family)  # and its family's 30 s
    assert refine_fits(spec, lucky, 90.0, family)


def test_a_trials_time_beyond_its_epochs_is_read_off_its_own_family() -> None:
    measured: list[tuple[str | None, float | None]] = [("cnn", 2.0), ("inception", 20.0)]
    measured += [("cnn", 1.0), ("inception", 28.0), ("cnn", None)]  # None: not measured
    assert fixed_seconds_of("inception", measured) == 28.0
    assert fixed_seconds_of("cnn", measured) == 2.0
    assert fixed_seconds_of("mobilenet", measured) == 28.0 * UNSEEN_FAMILY_MARGIN
    assert fixed_seconds_of("cnn", []) == 0.0
    # a family whose only trial went unmeasured (its trainer's first) is not unseen
    first: list[tuple[str | None, float | None]] = [("cnn", None), ("inception", 28.0)]
    assert fixed_seconds_of("cnn", first) == 28.0
    assert fixed_seconds_of("mobilenet", first) == 28.0 * UNSEEN_FAMILY_MARGIN
    # a trainer's first trial (loading the dataset) drops out after RECENT_TRIALS more
    warm = [("cnn", 40.0)] + [("cnn", 1.0)] * RECENT_TRIALS
    assert fixed_seconds_of("cnn", warm) == 1.0


def test_exploration_never_closes_before_enough_trials_completed() -> None:
    spec = refine_spec()
    assert exploration_closes(spec, [10.0], [(0.9, 10.0, 0.0)], lambda: 520.0, 5) is None
    assert exploration_closes(spec, [], [], lambda: 520.0, 5) is None
    untimed = make_spec(training={"refine": {"topK": 1, "epochs": 6}})
    assert exploration_closes(untimed, [10.0] * 3, [(0.9, 10.0, 0.0)] * 3, lambda: 1e9, 3) is None


def test_a_slow_start_up_trial_in_flight_does_not_keep_refine_out() -> None:
    """The guard waits for the start-up trials to be asked for, not to complete: a slow
    fifth one still training at the deadline kept refine out (bench/vs_peers.py)."""
    spec = refine_spec(timeout="10m")
    spec = spec.model_copy(
        update={"sampler": spec.sampler.model_copy(update={"n_startup_trials": 5})}
    )
    paces = [10.0] * 4
    explored = [(0.9, 10.0, 0.0), (0.8, 10.0, 0.0), (0.7, 10.0, 0.0), (0.6, 10.0, 0.0)]
    assert exploration_closes(spec, paces, explored, lambda: 520.0, 4) is None  # 1 unasked
    assert exploration_closes(spec, paces, explored, lambda: 520.0, 5) is not None
    assert exploration_closes(spec, paces, explored[:1], lambda: 520.0, 5) is None  # < topK


def test_an_epochs_time_is_read_off_the_trials_of_nearest_size() -> None:
    trained = [(10.0, 3.0), (2.0, 2.0), (50.0, 11.0)]
    assert epoch_seconds_at(6.0, []) is None
    assert epoch_seconds_at(6.0, trained) == pytest.approx(2.5)  # between 2 and 10 MFLOPs
    assert epoch_seconds_at(30.0, trained) == pytest.approx(7.0)
    # below the smallest, halfway between its time and in proportion (fixed cost unknown)
    assert epoch_seconds_at(0.5, trained) == pytest.approx(1.0)
    # beyond the largest, in proportion: an epoch's fixed cost makes this an upper bound
    assert epoch_seconds_at(100.0, trained) == pytest.approx(22.0)
    assert epoch_seconds_at(100.0, [(5.0, 2.0), (5.0, 4.0)]) == pytest.approx(80.0)


def test_an_epochs_time_is_read_off_its_own_family_or_twice_the_others() -> None:
    trained: list[tuple[str | None, float, float]] = [
        ("cnn", 10.0, 3.0),
        ("cnn", 2.0, 2.0),
        ("inception", 10.0, 9.0),
    ]
    assert epoch_seconds_of("cnn", 6.0, []) is None
    assert epoch_seconds_of("cnn", 6.0, trained) == pytest.approx(2.5)
    assert epoch_seconds_of("inception", 20.0, trained) == pytest.approx(18.0)
    # a family none trained: all of them, twice over (an estimate erring short costs refine)
    # (between 2 and 10 MFLOPs of any family, as epoch_seconds_at reads them: 2.5 s)
    assert epoch_seconds_of("mobilenet", 6.0, trained) == pytest.approx(UNSEEN_FAMILY_MARGIN * 2.5)
    # a user's own model has no family of ours: one family
    assert epoch_seconds_of(None, 4.0, [(None, 2.0, 2.0), (None, 10.0, 3.0)]) == pytest.approx(2.25)


def test_refine_retrains_the_best_first_the_earliest_of_equal_values_first() -> None:
    spec = refine_spec()
    explored = [rec(0, 0.5), rec(1, 0.9), rec(2, 0.7), rec(3, 0.9), rec(4, None, state="failed")]
    ranked = refine_ranked(spec, explored, "maximize")
    assert [r.number for r in ranked] == [1, 3]
    assert len(explored) == 5  # the caller's list is left as it was
    ranked = refine_ranked(spec, explored, "minimize")
    assert [r.number for r in ranked] == [0, 2]


def test_the_end_says_what_was_explored_and_the_best() -> None:
    spec = refine_spec()
    best = rec(3, 0.875)
    outcome = end_outcome(spec, Counts(explore_used=5, best=best), None)
    assert (outcome.reason, outcome.failed) == ("maxTrials", False)
    assert outcome.message == "5 trials explored; best trial 3: val_accuracy 0.8750"
    assert "no feasible trial completed" in end_outcome(spec, Counts(infeasible=2), None).message
    assert "no trial completed" in end_outcome(spec, Counts(), None).message
    refined = rec(6, 0.9, phase="refine")
    closed = end_outcome(spec, Counts(explore_used=5, best=best, history=[best, refined]), "x")
    assert closed.reason == "timeout"
    assert closed.message.startswith("5 trials explored, then refined within budget.timeout 10m")
    # bench/vs_peers.py: exploration closed, but the trial in flight outlasted its estimate
    cut = end_outcome(spec, Counts(explore_used=5, best=best, history=[best]), "x")
    assert cut.message.startswith("5 trials explored, then no refine ended within budget.timeout")


# --- deadlines -------------------------------------------------------------------------


def flight(trial_id: int, *, heard: bool, at: float, retries: int = 0) -> InFlight:
    trial = sent(number=trial_id, trial_id=trial_id)
    attrs = {Attr.RETRIES: retries} if retries else {}
    return InFlight(
        trial=None,  # type: ignore[arg-type]  # the deadlines never touch the study
        message=trial,
        record=rec(trial_id, None, state="running", trial_id=trial_id, attrs=attrs),
        sent_at=at,
        last_heard=at,
        heard=heard,
    )


def test_an_epochs_time_leaves_out_what_only_the_first_epoch_pays() -> None:
    """bench/vs_peers.py seed 5: a trainer's first trial took 79 s for 2 epochs, most of it
    warm-up; read as 40 s an epoch, every model after it looked too slow to explore."""
    f = flight(1, heard=False, at=0.0)
    deadlines = Deadlines(stale_after=None, first_progress_grace=900.0, max_retries=2)
    for epoch, at in ((1, 50.0), (2, 62.0), (3, 74.0)):
        deadlines.heard(f, at)
        f.told(1, epoch, replay=False)
    assert f.epoch_seconds() == 12.0
    # beyond its epochs: its first took 38 s more than the others, its result came 16 s
    # after its last
    assert f.fixed_seconds(90.0, 12.0) == 54.0
    f.told(2, 2, replay=True)  # a checkpoint's epoch, told again: not a new measure
    assert f.epoch_seconds() == 12.0
    assert f.fixed_seconds(90.0, 12.0) is None  # two attempts: not one run's clock
    one = flight(2, heard=False, at=0.0)
    one.told(1, 1, replay=False)
    assert one.epoch_seconds() is None
    attrs = {Attr.EPOCHS: 3, Attr.EPOCH_SECONDS: 12.0}
    assert epoch_pace(rec(1, 0.9, seconds=74.0, attrs=attrs)) == 12.0
    assert epoch_pace(rec(1, 0.9, seconds=74.0, attrs={Attr.EPOCHS: 2})) == 37.0
    assert epoch_pace(rec(1, None, state="failed", attrs={})) is None
    assert fixed_seconds(rec(1, 0.9, attrs={Attr.FIXED_SECONDS: 16.0})) == 16.0
    assert fixed_seconds(rec(1, 0.9, attrs=attrs)) is None  # not measured


def test_a_trial_silent_since_its_last_progress_is_stale() -> None:
    deadlines = Deadlines(stale_after=60.0, first_progress_grace=900.0, max_retries=2)
    flights = {1: flight(1, heard=True, at=0.0), 2: flight(2, heard=True, at=30.0)}
    flights[3] = flight(3, heard=False, at=0.0)  # never heard: the first-progress deadline's
    assert [t for t, _ in deadlines.stale(flights, 60.0)] == [1]
    assert deadlines.stale(flights, 60.0)[0][1].startswith("no progress for 60 s")
    assert Deadlines(None, 900.0, 2).stale(flights, 1e9) == []


def test_the_first_progress_deadline_starts_once_the_queue_is_empty() -> None:
    deadlines = Deadlines(stale_after=None, first_progress_grace=60.0, max_retries=2)
    flights = {1: flight(1, heard=False, at=0.0)}
    assert deadlines.unheard(flights, 100.0, True, lambda: 1) == []  # still queued
    assert deadlines.unheard(flights, 110.0, True, lambda: 0) == []  # taken now
    assert flights[1].taken_at == 110.0
    assert deadlines.unheard(flights, 112.0, True, lambda: 0) == []  # asked too soon again
    overdue = deadlines.unheard(flights, 170.0, True, lambda: 0)
    assert overdue == [(1, "no first progress 60 s after a trainer took it")]
    assert Deadlines(None, 60.0, 2).unheard(flights, 1e9, False, lambda: 0) == []


def test_a_slow_first_epoch_lengthens_the_first_progress_deadline() -> None:
    deadlines = Deadlines(stale_after=None, first_progress_grace=60.0, max_retries=2)
    slow = flight(1, heard=False, at=0.0)
    deadlines.heard(slow, 50.0)
    assert slow.heard
    assert deadlines.first_progress == 150.0  # three times the slowest first epoch
    deadlines.heard(slow, 500.0)  # later progress does not count as a first epoch
    assert deadlines.first_progress == 150.0


def test_a_lost_trial_is_retried_at_most_max_retries_times() -> None:
    deadlines = Deadlines(stale_after=60.0, first_progress_grace=60.0, max_retries=2)
    assert deadlines.may_retry(flight(1, heard=True, at=0.0))
    assert deadlines.may_retry(flight(1, heard=True, at=0.0, retries=1))
    given_up = flight(1, heard=True, at=0.0, retries=2)
    assert not deadlines.may_retry(given_up)
    assert deadlines.retries(given_up) == 2


def test_a_resumed_trial_costs_every_epoch_trained_and_says_what_was_redone_and_saved() -> None:
    """Attempt 1 trained epochs 1-3 and went away; attempt 2 went on from its checkpoint
    at 3 (told again, as a replay) and trained 4-6 in 300 s at $3.60/hour: $0.10 an epoch.
    Without a checkpoint, attempt 2 trains all 6: the 3 it repeats are the dollars lost."""
    trial = sent()
    trained = {(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)}
    earlier = EarlierAttempts.of(trained, {2: 3}, last=2)
    assert earlier == EarlierAttempts(trained=3, resumed=0)  # the last attempt's own left out
    resumed = result_of(trial, epochs_run=6, resumed_at=3, train_seconds=300.0, attempt=2)
    attrs = result_attrs(resumed, 3.6, "val_accuracy", earlier)
    assert attrs[Attr.COST] == pytest.approx(0.6)  # six epochs trained in all, at $0.10
    assert Attr.REDONE_USD not in attrs  # nothing trained twice
    assert attrs[Attr.SAVED_USD] == pytest.approx(0.3)  # epochs 1-3 not trained again
    again = result_of(trial, epochs_run=6, resumed_at=0, train_seconds=600.0, attempt=2)
    attrs = result_attrs(again, 3.6, "val_accuracy", EarlierAttempts(trained=3))
    assert attrs[Attr.COST] == pytest.approx(0.9)
    assert attrs[Attr.REDONE_EPOCHS] == 3
    assert attrs[Attr.REDONE_USD] == pytest.approx(0.3)
    assert Attr.SAVED_USD not in attrs
