"""MoE dispatch (ExFlow): routing layout, permute/unpermute kernels.

Kernels: csrc/moe/. References: inferops.reference.moe.
"""

from .dispatcher import DispatchHandle, DispatchResult, MoEDispatcher, RouteState
from .grouped import grouped_expert_mlp, grouped_matmul, grouped_mm_available
from .layout import RoutingLayout, default_placement, permute, routing_layout, unpermute
from .parallel import (
    SUPPORTED_MOE_MODEL_TYPES,
    ExFlowModel,
    ExpertParallelMoE,
    LocalExperts,
    moe_gates,
    moe_layer_indices,
    parallelize,
)
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
    "ExFlowModel",
    "ExpertParallelMoE",
    "LocalExperts",
    "SUPPORTED_MOE_MODEL_TYPES",
    "grouped_expert_mlp",
    "grouped_matmul",
    "grouped_mm_available",
    "moe_gates",
    "moe_layer_indices",
    "parallelize",
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
