"""deltafm: Contrastive Flow Matching (ΔFM) for PyTorch.

The drop-in loss::

    import deltafm
    j = deltafm.uniform_negatives(len(x_t), generator=g, device=x_t.device)
    loss = deltafm.contrastive_flow_matching_loss(model(x_t, t, y), u, j, lam=0.05)

The core (this namespace) imports only torch and numpy-free modules; the training framework,
models, data and evaluation live in subpackages imported on demand.
"""

from .correction import BiasCorrection, MeanTarget, bias_correct, to_delta_optimum
from .guidance import GuidedVelocity, cfg_combine
from .losses import (
    LossParts,
    check_lambda,
    contrastive_flow_matching_loss,
    contrastive_flow_matching_parts,
    contrastive_loss_parts,
    flow_matching_loss,
)
from .negatives import (
    NegativePool,
    NegativeSampler,
    derangement_negatives,
    different_class_negatives,
    gather_across_ranks,
    hard_negatives,
    uniform_negatives,
)
from .objective import DeltaFMObjective, ObjectiveOutput
from .paths import (
    CosinePath,
    LinearPath,
    PathSample,
    ProbPath,
    VPPath,
    from_reference_time,
    get_path,
    to_reference_time,
)
from .schedules import LambdaSchedule
from .solvers import SOLVERS, SolverResult, nfe_to_steps, sample_ode, sample_sde, solve
from .timesteps import LogitNormalTime, ModeTime, UniformTime, get_time_sampler, time_grid

__version__ = "0.1.0"

__all__ = [
    "BiasCorrection",
    "CosinePath",
    "DeltaFMObjective",
    "GuidedVelocity",
    "LambdaSchedule",
    "LinearPath",
    "LogitNormalTime",
    "LossParts",
    "MeanTarget",
    "ModeTime",
    "NegativePool",
    "NegativeSampler",
    "ObjectiveOutput",
    "PathSample",
    "ProbPath",
    "SOLVERS",
    "SolverResult",
    "UniformTime",
    "VPPath",
    "bias_correct",
    "cfg_combine",
    "check_lambda",
    "contrastive_flow_matching_loss",
    "contrastive_flow_matching_parts",
    "contrastive_loss_parts",
    "derangement_negatives",
    "different_class_negatives",
    "flow_matching_loss",
    "from_reference_time",
    "gather_across_ranks",
    "get_path",
    "get_time_sampler",
    "hard_negatives",
    "nfe_to_steps",
    "sample_ode",
    "sample_sde",
    "solve",
    "time_grid",
    "to_delta_optimum",
    "to_reference_time",
    "uniform_negatives",
]
