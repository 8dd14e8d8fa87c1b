"""optax_stab: optax gradient transformations that keep training stable."""

from optax_stab._smoothing import (
    AmplifySlowState,
    EmaSmoothingState,
    FirSmoothingState,
    WindowedMedianState,
    amplify_slow,
    ema_smoothing,
    fir_smoothing,
    gaussian_smoothing,
    moving_average,
    windowed_median,
)

__version__ = "0.1.0"

__all__ = [
    "AmplifySlowState",
    "EmaSmoothingState",
    "FirSmoothingState",
    "WindowedMedianState",
    "amplify_slow",
    "ema_smoothing",
    "fir_smoothing",
    "gaussian_smoothing",
    "moving_average",
    "windowed_median",
]
