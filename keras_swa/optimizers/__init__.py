"""Optimizer wrappers that keep averaged weights inside the train step.

`SWA`, `EMA`, `PowerEMA` and `PostHocEMA` wrap any Keras optimizer the way
Keras' own `LossScaleOptimizer` does: the inner optimizer computes the
update, then the wrapper folds the new weights into its averages on snapshot
steps. Everything runs in the compiled train step; a step that takes no
snapshot does no work over the weights.

- `base`: `AveragedOptimizer`, the wrapper every other one is (delegation,
  the snapshot schedule, the averages of the engine, saving);
- `swa`: `SWA`, the equal-weight mean (optionally of a window);
- `ema`: `EMA`, the exponential moving average;
- `power_ema`: `PowerEMA`, `PostHocEMA` and its `PowerEMAProfile`s.
"""

from keras_swa.optimizers.base import AveragedOptimizer
from keras_swa.optimizers.base import check_inner_optimizer
from keras_swa.optimizers.ema import EMA
from keras_swa.optimizers.power_ema import PostHocEMA
from keras_swa.optimizers.power_ema import PowerEMA
from keras_swa.optimizers.power_ema import PowerEMAProfile
from keras_swa.optimizers.power_ema import check_sigma_rel
from keras_swa.optimizers.swa import SWA
from keras_swa.optimizers.wrapper import WrappedOptimizer

# The names other modules of keras_swa knew them by.
_check_sigma_rel = check_sigma_rel
_check_inner_optimizer = check_inner_optimizer
