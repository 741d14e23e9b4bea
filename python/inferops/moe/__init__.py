"""MoE dispatch (ExFlow): routing layout, permute/unpermute kernels.

Kernels: csrc/moe/. References: inferops.reference.moe.
"""

from .dispatcher import DispatchHandle, DispatchResult, MoEDispatcher, RouteState
from .layout import RoutingLayout, default_placement, permute, routing_layout, unpermute
from .placement import (
    Placement,
    RoutingRecorder,
    affinity_report,
    cross_gpu_routes,
    exchange_rows,
    place_experts,
    round_robin_placement,
    synthetic_trace,
    transition_counts,
)

__all__ = [
    "MoEDispatcher",
    "DispatchResult",
    "DispatchHandle",
    "RouteState",
    "RoutingLayout",
    "routing_layout",
    "permute",
    "unpermute",
    "default_placement",
    "Placement",
    "place_experts",
    "round_robin_placement",
    "cross_gpu_routes",
    "exchange_rows",
    "transition_counts",
    "synthetic_trace",
    "RoutingRecorder",
    "affinity_report",
]
