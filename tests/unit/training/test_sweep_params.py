"""`finetune sweep`'s --param parsing and checking, trial enumeration, and trial specs (pure)."""

from __future__ import annotations

import pytest

from llmplatform.specs import FineTuneSpec
from llmplatform.training.sweep_params import SweepError, SweepPlan, best_trial, build_plan, parse_params, trial_overrides, trial_spec


@pytest.fixture
def base() -> FineTuneSpec:
    return FineTuneSpec(name="rev", base_model="llama2-tiny", data={"train": "/d/train.jsonl", "validation": "/d/eval.jsonl"},
                        hyperparameters={"learning_rate": 2e-3, "max_steps": 20}, mlflow={"registered_model_name": "rev"})


def test_values_are_typed_like_the_spec_fields(base):
    lr, rank, opt = parse_params(["hyperparameters.learning_rate=1e-4,3e-4", "lora.rank=8,16", "hyperparameters.optimizer=adamw"], base)
    assert lr.values == (1e-4, 3e-4) and rank.values == (8, 16) and opt.values == ("adamw",)


@pytest.mark.parametrize("text, says", [
    ("hyperparameters.learnig_rate=1e-4", ["hyperparameters has no field 'learnig_rate'", "learning_rate"]),
    ("lora=8", ["lora is a section", "lora.rank"]),
    ("lora.rank.x=1", ["lora.rank is a value"]),
    ("lora.rank=8,sixteen", ["--param lora.rank='sixteen'", "integer"]),
    ("lora.rank=0", ["--param lora.rank=0", "greater than or equal to 1"]),
    ("hyperparameters.learning_rate", ["PATH=V1,V2"]),
    ("lora.rank=8,8", ["repeated"]),
    ("name=a,b", ["name is derived"]),
])
def test_bad_params_name_the_param_and_the_fix(base, text, says):
    with pytest.raises(SweepError) as err:
        parse_params([text], base)
    for part in says:
        assert part in str(err.value)


def test_a_param_given_twice_or_none_is_refused(base):
    with pytest.raises(SweepError, match="given twice"):
        parse_params(["lora.rank=8", "lora.rank=16"], base)
    with pytest.raises(SweepError, match="at least one --param"):
        parse_params([], base)


def test_grid_is_every_combination_and_random_is_seeded(base):
    params = parse_params(["hyperparameters.learning_rate=1e-4,3e-4,1e-3", "lora.rank=8,16"], base)
    grid = trial_overrides(params)
    assert len(grid) == 6 and {"hyperparameters.learning_rate": 1e-3, "lora.rank": 16} in grid
    drawn = trial_overrides(params, "random", trials=5, seed=1)
    assert len(drawn) == 5 and drawn == trial_overrides(params, "random", trials=5, seed=1)
    with pytest.raises(SweepError, match="--trials"):
        trial_overrides(params, "random")
    with pytest.raises(SweepError, match="--trials goes with --search random"):
        trial_overrides(params, "grid", trials=3)


def test_a_trial_spec_is_the_base_with_its_values_and_keeps_the_rest(base):
    spec = trial_spec(base, {"hyperparameters.learning_rate": 3e-4, "lora.rank": 8}, 2)
    assert spec.name == "rev-t2" and spec.hyperparameters.learning_rate == 3e-4 and spec.lora.rank == 8
    assert spec.hyperparameters.max_steps == 20 and spec.mlflow.registered_model_name == "rev" and spec.data == base.data
    assert base.lora.rank == 16  # the base is not changed


def test_combinations_invalid_together_are_refused_before_compute(base):
    two = base.model_copy(update={"resources": base.resources.model_copy(update={"workers": 2})})
    with pytest.raises(SweepError, match=r"trial 3 \(resources.strategy='fsdp', hyperparameters.optimizer='paged_adamw_8bit'\) is not a valid spec"):
        build_plan(["resources.strategy=ddp,fsdp", "hyperparameters.optimizer=adamw,paged_adamw_8bit"], two)


def test_build_plan_checks_the_flags_and_round_trips(base):
    plan, specs = build_plan(["hyperparameters.learning_rate=1e-4,1e-3"], base, max_concurrent=2, early_stop="asha")
    assert [s.hyperparameters.learning_rate for s in specs] == [1e-4, 1e-3]
    assert SweepPlan.from_dict(plan.to_dict()) == plan
    for kwargs, says in [({"metric": "accuracy"}, "--metric"), ({"mode": "best"}, "--mode"), ({"early_stop": "hyperband"}, "--early-stop")]:
        with pytest.raises(SweepError, match=says):
            build_plan(["lora.rank=8"], base, **kwargs)


def test_best_trial_is_the_best_finished_one():
    rows = [{"trial": 0, "eval_loss": 1.0, "checkpoint_path": "/a"}, {"trial": 1, "eval_loss": 0.5, "checkpoint_path": "/b"},
            {"trial": 2, "eval_loss": 0.1}]  # no adapter: never best
    assert best_trial(rows, "eval_loss", "min")["trial"] == 1
    assert best_trial(rows, "eval_loss", "max")["trial"] == 0
    assert best_trial([], "eval_loss", "min") is None


def test_the_flags_build_the_spec_section_and_both_give_the_same_trials(base):
    from llmplatform.specs import SweepSection
    from llmplatform.training.sweep_params import plan_from_section, section_from_flags

    flags = dict(search="random", trials=3, metric="loss", mode="min", max_concurrent=2, early_stop="asha")
    section = section_from_flags(["hyperparameters.learning_rate=1e-4,1e-3", "lora.rank=8,16"], base, **flags)
    assert section == SweepSection(params={"hyperparameters.learning_rate": [1e-4, 1e-3], "lora.rank": [8, 16]}, **flags)
    from_flags = build_plan(["hyperparameters.learning_rate=1e-4,1e-3", "lora.rank=8,16"], base, **flags)
    in_spec = base.model_copy(update={"sweep": section})
    from_spec = plan_from_section(in_spec.sweep, in_spec)
    assert from_flags[0] == from_spec[0] and [s.name for s in from_flags[1]] == [s.name for s in from_spec[1]]
    assert all(s.sweep is None for s in from_spec[1])  # a trial is one training run, not a sweep again


@pytest.mark.parametrize("section, field, says", [
    ({"params": {"lora.rnak": [8]}}, "sweep.params.lora.rnak", "sweep.params.lora.rnak: lora has no field 'rnak'"),
    ({"params": {"lora.rank": [8, 0]}}, "sweep.params.lora.rank", "fix the value in sweep.params.lora.rank"),
    ({"params": {"lora.rank": []}}, "sweep.params.lora.rank", "give at least one value"),
    ({"params": {"sweep.max_concurrent": [1, 2]}}, "sweep.params.sweep.max_concurrent", "not swept"),
    ({"params": {"lora.rank": [8]}, "search": "random"}, "sweep.trials", "sweep.search random needs sweep.trials N"),
    ({"params": {"lora.rank": [8]}, "trials": 2}, "sweep.trials", "sweep.trials goes with sweep.search random"),
])
def test_a_bad_spec_section_names_its_field(base, section, field, says):
    from llmplatform.specs import SweepSection
    from llmplatform.training.sweep_params import plan_from_section

    with pytest.raises(SweepError) as err:
        plan_from_section(SweepSection(**section), base)
    assert err.value.field == field and says in str(err.value)


def test_a_sweep_document_too_long_for_one_argument_is_refused(base):
    from llmplatform.training.sweep_params import MAX_SWEEP_JSON, sweep_document

    plan, _ = build_plan(["lora.rank=8,16"], base)
    with pytest.raises(SweepError, match="too many for one sweep job's command line") as err:
        sweep_document(plan, [{"spec": "x" * MAX_SWEEP_JSON}], cli=False)
    assert err.value.field == "sweep.params" and "fewer values in sweep.params" in str(err.value)
