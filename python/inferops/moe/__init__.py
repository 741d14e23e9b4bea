"""MoE dispatch (ExFlow): routing layout, permute/unpermute kernels.

Kernels: csrc/moe/. References: inferops.reference.moe.
"""

from .layout import RoutingLayout, default_placement, permute, routing_layout, unpermute

__all__ = ["RoutingLayout", "routing_layout", "permute", "unpermute", "default_placement"]
