"""The residual provider: runs the model only as far as the locations a request reads."""

from __future__ import annotations

import torch
from torch import Tensor

from service.core.locations import ResidualLocation
from service.model.base import Transformer


class ResidualStream:
    """The residual stream of one prompt, computed lazily and kept per location.

    Asking for a location runs the forward pass from the latest location already
    computed, so one request that reads several locations pays for one pass up to the
    last of them. Tensors are computed without autograd; callers that differentiate make
    their own leaf copies.
    """

    def __init__(self, model: Transformer, token_ids: Tensor) -> None:
        self.model = model
        self.token_ids = token_ids
        self.n_layers = model.config.n_layers
        self._by_order: dict[int, Tensor] = {}

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @torch.no_grad()
    def at(self, location: ResidualLocation) -> Tensor:
        target = location.order(self.n_layers)
        if target in self._by_order:
            return self._by_order[target]

        earlier = [order for order in self._by_order if order < target]
        if earlier:
            order = max(earlier)
        else:
            order = 0
            self._by_order[0] = self.model.embed(self.token_ids)
        resid = self._by_order[order]

        while order < target:
            layer = order // 2
            if order % 2 == 0:
                resid = resid + self.model.attention_sublayer(layer, resid).out
            else:
                resid = resid + self.model.mlp_sublayer(layer, resid).out
            order += 1
            self._by_order[order] = resid
        return resid
