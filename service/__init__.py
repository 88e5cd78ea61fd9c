"""Attribution service: activations, gradients and JVPs of transformer units over HTTP."""
