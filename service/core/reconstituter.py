"""The reconstituter: value, gradient and JVP of one location's function of its residual.

For a location spec, `f(R)` recomputes the location's activations from the residual
tensor `R` immediately before it, and from nothing else, so derivatives of `f` are
direct effects. The gradient of one node uses reverse mode. The JVP of a whole location
along one write vector uses forward mode (`torch.func.jvp`), so the Jacobian is never
materialized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.core.locations import ResidualLocation
from service.core.nodes import LocationSpec, Node
from service.core.residual import ResidualStream
from service.model.base import Transformer


@dataclass
class GradientResult:
    activation: float
    residual_location: ResidualLocation
    gradient: Tensor  # [n_tokens, d_model]


@dataclass
class JvpResult:
    jvp: Tensor  # shaped like the downstream location's activations
    upstream: bool
    write_location: ResidualLocation
    residual_location: ResidualLocation


class Reconstituter:
    """Computes values and derivatives of nodes for one prompt.

    One instance serves one request: it keeps the prompt's residual stream so that
    several nodes of the request share one forward pass.
    """

    def __init__(self, model: Transformer, token_ids: Tensor, autoencoders: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.stream = ResidualStream(model, token_ids)
        self.autoencoders: Mapping[str, Any] = autoencoders or {}
        self._gradients: dict[Node, GradientResult] = {}

    @property
    def n_layers(self) -> int:
        return self.model.config.n_layers

    def residual_location(self, spec: LocationSpec) -> ResidualLocation:
        return spec.kind.residual_location(spec, self.model.config)

    def function(self, spec: LocationSpec) -> Callable[[Tensor], Tensor]:
        """Return f, mapping the spec's residual tensor to the location's activations."""
        kind = spec.kind
        if spec.downstream is not None:
            # Compute the downstream gradient now, outside any transform that calls f.
            self.gradient(spec.downstream)

        def f(resid: Tensor) -> Tensor:
            return kind.activations(spec, resid, self)

        return f

    def activations(self, spec: LocationSpec) -> Tensor:
        resid = self.stream.at(self.residual_location(spec))
        with torch.no_grad():
            return self.function(spec)(resid)

    def activation(self, node: Node) -> float:
        return float(self.activations(node.spec)[node.index])

    def gradient(self, node: Node) -> GradientResult:
        """Differentiate one node with respect to its residual tensor, in reverse mode."""
        if node in self._gradients:
            return self._gradients[node]
        location = self.residual_location(node.spec)
        resid = self.stream.at(location).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = self.function(node.spec)(resid)[node.index]
            (gradient,) = torch.autograd.grad(value, resid, allow_unused=True)
        if gradient is None:
            gradient = torch.zeros_like(resid)
        result = GradientResult(float(value.detach()), location, gradient.detach())
        self._gradients[node] = result
        return result

    def write(self, node: Node) -> tuple[Tensor, ResidualLocation]:
        """Return the node's write vector, [n_tokens, d_model], and where it is added."""
        kind = node.spec.kind
        return kind.write(node, self), kind.write_location(node, self.model.config)

    def is_upstream(self, write_location: ResidualLocation, residual_location: ResidualLocation) -> bool:
        """Tell whether a write added at `write_location` is still in the residual at `residual_location`."""
        return write_location.order(self.n_layers) <= residual_location.order(self.n_layers)

    def direct_effect(self, upstream: Node, gradient: GradientResult) -> float | None:
        """Return sum(write * gradient), or None when the write lands after the gradient's residual."""
        write_location = upstream.spec.kind.write_location(upstream, self.model.config)
        if not self.is_upstream(write_location, gradient.residual_location):
            return None
        vector, _ = self.write(upstream)
        return float((vector.to(gradient.gradient.dtype) * gradient.gradient).sum())

    def jvp(self, spec: LocationSpec, write_vector: Tensor, write_location: ResidualLocation) -> JvpResult:
        """Push one write vector through f in forward mode: the first-order change of every node."""
        location = self.residual_location(spec)
        resid = self.stream.at(location)
        if not self.is_upstream(write_location, location):
            return JvpResult(self._zero_activations(spec, resid), False, write_location, location)

        # The JVP is linear in the tangent, so a unit-scale tangent keeps very large or very
        # small writes from overflowing or underflowing in the model's dtype.
        scale = float(write_vector.abs().max())
        if scale == 0.0:
            return JvpResult(self._zero_activations(spec, resid), True, write_location, location)
        tangent = (write_vector / scale).to(device=resid.device, dtype=resid.dtype)
        _, jvp = torch.func.jvp(self.function(spec), (resid,), (tangent,))  # type: ignore[misc]
        return JvpResult(jvp.detach().double() * scale, True, write_location, location)

    def _zero_activations(self, spec: LocationSpec, resid: Tensor) -> Tensor:
        """Return zeros shaped like the location's activations, the JVP of a write that cannot move them."""
        with torch.no_grad():
            shape = self.function(spec)(resid).shape
        return torch.zeros(shape, dtype=resid.dtype, device=resid.device)
