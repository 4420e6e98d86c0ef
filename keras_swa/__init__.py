"""Stochastic Weight Averaging and related weight averaging for Keras 3."""

# `python -m keras_swa.average` imports this package before it runs: its
# arguments and files are checked first, without Keras (seconds), so that
# `--help` and a mistake answer at once. Nothing happens for any other program.
from keras_swa import _average_args

_average_args.check_before_import()

from keras_swa import metrics
from keras_swa.batch_norm import update_bn
from keras_swa.bma import predict_bma
from keras_swa.bma import sampled_weights
from keras_swa.callbacks import StochasticWeightAveraging
from keras_swa.checkpoints import average_checkpoints
from keras_swa.checkpoints import greedy_soup
from keras_swa.evaluation import AverageModelCheckpoint
from keras_swa.evaluation import EvaluateAverage
from keras_swa.optimizers import AveragedOptimizer
from keras_swa.optimizers import EMA
from keras_swa.optimizers import PostHocEMA
from keras_swa.optimizers import PowerEMA
from keras_swa.optimizers import SWA
from keras_swa.posthoc_ema import EMASnapshots
from keras_swa.posthoc_ema import reconstruct_ema
from keras_swa.posthoc_ema import sweep_ema
from keras_swa.schedule_free import ScheduleFree
from keras_swa.schedules import SWALearningRate
from keras_swa.swag import SWAG
from keras_swa.weights import assign_average
from keras_swa.weights import averaged_weights

__version__ = "0.1.0"
