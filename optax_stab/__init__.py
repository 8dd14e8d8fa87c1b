"""optax_stab: optax gradient transformations that keep training stable."""

from optax_stab._adaptive_clipping import (
    AdaptiveTensorClipState,
    AutoclipState,
    ZscoreClipState,
    adaptive_tensor_clip,
    autoclip,
    zscore_clip,
)
from optax_stab._amplify import sign_power, sign_sqrt_amplification
from optax_stab._clipping import (
    ClipByNormState,
    SpikeClipState,
    clip_by_norm,
    spike_clip,
)
from optax_stab._constraints import add_l1_penalty, clip_weights
from optax_stab._fir import (
    FirSmoothingState,
    MovingAverageState,
    fir_smoothing,
    gaussian_smoothing,
    moving_average,
)
from optax_stab._guards import (
    GuardNonfiniteState,
    SpikeGuardState,
    guard_nonfinite,
    spike_guard,
)
from optax_stab._health import HealthState, health_monitor
from optax_stab._health_report import health_report
from optax_stab._median import WindowedMedianState, windowed_median
from optax_stab._schedules import inverse_sqrt_decay
from optax_stab._smoothing import (
    AmplifySlowState,
    EmaSmoothingState,
    amplify_slow,
    ema_smoothing,
)
from optax_stab._stabilize import stabilize

__version__ = "0.1.0"

__all__ = [
    "AdaptiveTensorClipState",
    "AmplifySlowState",
    "AutoclipState",
    "ClipByNormState",
    "EmaSmoothingState",
    "FirSmoothingState",
    "GuardNonfiniteState",
    "HealthState",
    "MovingAverageState",
    "SpikeClipState",
    "SpikeGuardState",
    "WindowedMedianState",
    "ZscoreClipState",
    "adaptive_tensor_clip",
    "add_l1_penalty",
    "amplify_slow",
    "autoclip",
    "clip_by_norm",
    "clip_weights",
    "ema_smoothing",
    "fir_smoothing",
    "gaussian_smoothing",
    "guard_nonfinite",
    "health_monitor",
    "health_report",
    "inverse_sqrt_decay",
    "moving_average",
    "sign_power",
    "sign_sqrt_amplification",
    "spike_clip",
    "spike_guard",
    "stabilize",
    "windowed_median",
    "zscore_clip",
]
