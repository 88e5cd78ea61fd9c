"""Residual stream locations and the order in which the forward pass reaches them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ResidualName(StrEnum):
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    RESID_FINAL = "resid_final"


@dataclass(frozen=True)
class ResidualLocation:
    """One residual stream tensor, [n_tokens, d_model]; `layer` is None for resid_final."""

    name: ResidualName
    layer: int | None = None

    def order(self, n_layers: int) -> int:
        """Return the position in the forward pass; equal positions are the same tensor.

        resid_pre[L] is 2L, resid_mid[L] is 2L + 1, resid_post[L] = resid_pre[L + 1] is
        2L + 2 and resid_final = resid_post[n_layers - 1] is 2 * n_layers.
        """
        if self.name is ResidualName.RESID_FINAL:
            return 2 * n_layers
        assert self.layer is not None, f"{self.name} needs a layer"
        offset = {ResidualName.RESID_PRE: 0, ResidualName.RESID_MID: 1, ResidualName.RESID_POST: 2}
        return 2 * self.layer + offset[self.name]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name.value, "layer": self.layer}


def resid_pre(layer: int) -> ResidualLocation:
    return ResidualLocation(ResidualName.RESID_PRE, layer)


def resid_mid(layer: int) -> ResidualLocation:
    return ResidualLocation(ResidualName.RESID_MID, layer)


def resid_post(layer: int) -> ResidualLocation:
    return ResidualLocation(ResidualName.RESID_POST, layer)


RESID_FINAL = ResidualLocation(ResidualName.RESID_FINAL)
