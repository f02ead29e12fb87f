"""`objective`: the SequenceMatch loss (DESIGN §1); `objective.divergence` a discriminated union whose
members carry the parameters their divergence uses.

The kinds mirror `sm_dist.core.objective.DIVERGENCE_SPECS` (torch); tests/unit/test_config_registries.py
checks that they agree, so validating a config imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from sm_dist.config.base import Section, Variant, by_kind

_DATA_MIX = "Weight of data occupancy in the mixture E_mix (its chi^2 and value terms)."


class _Divergence(Variant):
    def params(self) -> dict[str, Any]:
        """Its kind and fields as `sm_dist.core.objective.ObjectiveParams` arguments."""
        return {"divergence": self.kind, **self.model_dump(exclude={"kind"})}


class Chi2Divergence(_Divergence):
    """chi^2: chi2_mixture is SequenceMatch (the chi^2 term on the mixture of data and model
    occupancies); chi2 puts the chi^2 term on the data alone."""

    kind: Literal["chi2_mixture", "chi2"] = Field("chi2_mixture", description="The divergence.")
    chi2_weight: float = Field(
        1e-3,
        ge=0.0,
        description="c, the chi^2 term's weight in logit units. The paper's alpha = 0.01 read as IQ-Learn's "
        "soft-Q temperature (the likely reading) gives c = alpha / (4 alpha_chi) ~ 0.0025-0.005; read as "
        "c = 1/(4 alpha) (unlikely) it is 25, which destroys the policy (docs/results_same_regime.md).",
    )
    data_mix: float = Field(0.5, ge=0.0, le=1.0, description=_DATA_MIX)


class PhiDivergence(_Divergence):
    """IQ-Learn's f-divergences without a chi^2 term: the data term weighted by phi'(r), capped."""

    kind: Literal["kl", "js", "hellinger"] = Field(description="The divergence.")
    data_mix: float = Field(0.5, ge=0.0, le=1.0, description=_DATA_MIX)
    weight_clip: float = Field(10.0, gt=0.0, description="Cap on the phi'(r) weights.")


class MleDivergence(_Divergence):
    """Maximum likelihood (behaviour cloning): the gamma^t-weighted cross-entropy of the data."""

    kind: Literal["mle"] = Field("mle", description="The divergence.")


DivergenceConfig = Annotated[Chi2Divergence | PhiDivergence | MleDivergence, Field(discriminator="kind")]

_FIX = (
    "write it under objective.divergence, e.g. objective: {divergence: {kind: %s, %s: ...}} (docs/config.md)"
)


class ObjectiveConfig(Section):
    """SequenceMatch objective (DESIGN §1)."""

    moved = {
        "chi2_weight": ("objective.chi2_weight", "objective.divergence.chi2_weight", _FIX % ("chi2_mixture", "chi2_weight")),
        "data_mix": ("objective.data_mix", "objective.divergence.data_mix", _FIX % ("chi2_mixture", "data_mix")),
        "weight_clip": ("objective.weight_clip", "objective.divergence.weight_clip", _FIX % ("kl", "weight_clip")),
    }  # fmt: skip
    divergence: DivergenceConfig = Field(
        default_factory=Chi2Divergence,
        description="f-divergence and its parameters, by `kind` (a bare name works too: `divergence: mle`): "
        "chi2_mixture (SequenceMatch), chi2, kl, js, hellinger, mle (the BC baseline).",
    )
    gamma: float = Field(0.998, gt=0.0, le=1.0, description="Discount over actions.")
    mask_noise_actions: bool = Field(True, description="Do not imitate injected noise actions (state kept).")
    warmup_steps: int = Field(20, ge=0, description="BC/MLE-only steps before the SequenceMatch loss starts.")
    sm_lambda: float = Field(0.5, ge=0.0, le=1.0, description="After warmup: (1-lambda) L_BC + lambda L_SM.")
    bkspc_discount: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="delta: a <bkspc> transition discounts by gamma * delta (1: plain gamma). Tried against "
        "the write/delete loop (sm_dist.core.objective docstring); it does not stop it.",
    )
    truncated_value: Literal["bootstrap", "complete"] = Field(
        "bootstrap",
        description="Value term of a truncated rollout: 'bootstrap' V(s_0) - gamma^T V(s_T) (the paper); "
        "'complete' V(s_0), its whole continuation telescoped, which removes the reward for raising V "
        "where write/delete loops are cut off (sm_dist.core.objective docstring).",
    )

    _divergence = by_kind("objective.divergence", DivergenceConfig)

    def params(self, bkspc_id: int):
        """The pure-torch objective's frozen parameters (`sm_dist.core.objective.ObjectiveParams`);
        imports torch, so only in the process that trains."""
        from sm_dist.core.objective import ObjectiveParams

        return ObjectiveParams(
            bkspc_id=bkspc_id, **self.divergence.params(), gamma=self.gamma,
            mask_noise_actions=self.mask_noise_actions, bkspc_discount=self.bkspc_discount,
            truncated_value=self.truncated_value,
        )  # fmt: skip
