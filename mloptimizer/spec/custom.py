"""``searchSpace.custom``: the user's own model builder and the parameters it takes.

The operator never runs the builder: it samples the declared parameters with the study's
sampler (TPE or random) and sends them in the trial; the trainer imports the builder and
calls it. Categorical choices are strings, as Katib's ``feasibleSpace.list`` is; the
builder converts them if it needs to.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from mloptimizer.rules import Rule, SpecModel

__all__ = ["BUILDER_PATTERN", "CustomCondition", "CustomParameter", "CustomSpace"]

# module:function, the module dotted, both Python identifiers
BUILDER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
_NAME_PATTERN = r"^[a-z_][a-z0-9_]*$"
_Choice = Annotated[str, Field(min_length=1, max_length=64)]


class CustomCondition(SpecModel):
    """Sample a parameter only when a categorical parameter took one of some values."""

    parameter: str = Field(
        pattern=_NAME_PATTERN,
        max_length=48,
        description="Name of a categorical parameter with no condition of its own.",
    )
    values: Annotated[list[_Choice], Field(min_length=1, max_length=32)] = Field(
        description="Its values under which this parameter is sampled (and passed)."
    )


class CustomParameter(SpecModel):
    """One parameter of the builder: an int or float range, or categorical choices."""

    rules = (
        Rule(
            cel="self.type == 'categorical' ? (has(self.choices) && !has(self.min) && "
            "!has(self.max)) : (has(self.min) && has(self.max) && !has(self.choices))",
            check=lambda s: (
                (s.choices is not None and s.min is None and s.max is None)
                if s.type == "categorical"
                else (s.min is not None and s.max is not None and s.choices is None)
            ),
            message="an int or float parameter needs min and max (and no choices); a "
            "categorical one needs choices (and no min or max)",
            field="type",
        ),
        Rule(
            cel="!has(self.min) || !has(self.max) || self.min <= self.max",
            check=lambda s: s.min is None or s.max is None or s.min <= s.max,
            message="min must be <= max",
            field="min",
        ),
        Rule(
            cel="!self.log || (has(self.min) && self.min > 0.0 && !has(self.step))",
            check=lambda s: not s.log or (s.min is not None and s.min > 0 and s.step is None),
            message="a log-scale parameter needs min > 0 and no step",
            field="log",
        ),
        Rule(
            cel="self.type != 'int' || ((!has(self.min) || self.min == double(int(self.min)))"
            " && (!has(self.max) || self.max == double(int(self.max)))"
            " && (!has(self.step) || self.step == double(int(self.step))))",
            check=lambda s: (
                s.type != "int"
                or all(v is None or float(v).is_integer() for v in (s.min, s.max, s.step))
            ),
            message="an int parameter's min, max and step must be whole numbers",
            field="min",
        ),
    )

    name: str = Field(
        pattern=_NAME_PATTERN,
        min_length=1,
        max_length=48,
        description="The key the builder finds the value under (lower case, digits, _).",
    )
    type: Literal["int", "float", "categorical"] = Field(description="int, float or categorical.")
    min: float | None = Field(
        default=None, ge=-1e12, le=1e12, description="Smallest value (int and float)."
    )
    max: float | None = Field(
        default=None, ge=-1e12, le=1e12, description="Largest value (int and float)."
    )
    step: float | None = Field(
        default=None,
        gt=0.0,
        le=1e12,
        description="Distance between values (int: default 1; float: continuous when unset).",
    )
    log: bool = Field(default=False, description="Sample on a log scale (needs min > 0).")
    choices: Annotated[list[_Choice], Field(min_length=1, max_length=32)] | None = Field(
        default=None, description="The values of a categorical parameter, as strings."
    )
    condition: CustomCondition | None = Field(
        default=None,
        description="Sample (and pass) this parameter only when another took given values.",
    )


class CustomSpace(SpecModel):
    """The user's own model: a builder function and the parameters the sampler chooses.

    The trainer imports ``builder`` (``module:function``) and calls it as
    ``function(params, input_shape=(h, w, c), num_classes=n)``; it returns a Keras model
    ending in a softmax over ``num_classes``. The trainer compiles it (Adam at the searched
    learning rate, the objective's loss and metrics), measures it, and trains it like any
    other trial.
    """

    rules = (
        Rule(
            cel="self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))",
            check=lambda s: len({p.name for p in s.parameters}) == len(s.parameters),
            message="parameter names must be unique",
            field="parameters",
        ),
        Rule(
            cel="self.parameters.all(p, !has(p.condition) || self.parameters.exists(q, "
            "q.name == p.condition.parameter && q.type == 'categorical' && !has(q.condition)))",
            check=lambda s: all(
                p.condition is None
                or any(
                    q.name == p.condition.parameter
                    and q.type == "categorical"
                    and q.condition is None
                    for q in s.parameters
                )
                for p in s.parameters
            ),
            message="a condition must name a categorical parameter of this list that has no "
            "condition of its own",
            field="parameters",
        ),
    )

    builder: str = Field(
        pattern=BUILDER_PATTERN,
        max_length=200,
        description="module:function that builds the model. The module is on the trainer "
        "image's Python path, or (mloptimizer run) a file beside the search file.",
    )
    parameters: Annotated[list[CustomParameter], Field(max_length=32)] = Field(
        default_factory=list,
        description="The builder's parameters, sampled in this order (conditional ones "
        "after the rest); each is passed under its name.",
    )
