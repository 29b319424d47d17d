"""Capacity planning by simulation: the platform's own scheduler in simulated time.

``simulate(config, profile, latency)`` runs one load profile; ``search_replicas`` finds the
fewest replicas per deployment that meet the profile's per-class p95 SLOs. The CLI is
``zimage-platform plan``.
"""

from zimage_platform.scheduling.simulation.latency import ComputeModel, LatencyModel, MeasuredLatency, load_latency
from zimage_platform.scheduling.simulation.profile import LoadProfile, load_profile
from zimage_platform.scheduling.simulation.search import SearchResult, search_replicas
from zimage_platform.scheduling.simulation.simulator import Simulation, SimulationResult, simulate

__all__ = [
    "ComputeModel",
    "LatencyModel",
    "LoadProfile",
    "MeasuredLatency",
    "SearchResult",
    "Simulation",
    "SimulationResult",
    "load_latency",
    "load_profile",
    "search_replicas",
    "simulate",
]
