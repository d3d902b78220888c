"""Old home of the training utilities, kept so that existing imports keep working.

They now live by concern: `longmem.training.optim` (optimizer, schedule),
`longmem.training.config_io` (configs, resume check), `longmem.training.checkpoints`,
`longmem.training.metrics` (metrics.csv, throughput, progress), `longmem.training.interrupt`
(Ctrl-C), and `longmem.runtime` (device, tokenizer loading). Import from those.
"""

from longmem.runtime import load_tokenizer, resolve_device  # noqa: F401
from longmem.training.checkpoints import (TrainState, latest_checkpoint, load_checkpoint, load_latest,  # noqa: F401
                                          save_checkpoint)
from longmem.training.config_io import check_resumable, config_from_dict, load_config  # noqa: F401
from longmem.training.interrupt import StopOnCtrlC  # noqa: F401
from longmem.training.metrics import MetricsLog, Throughput, progress_bar  # noqa: F401
from longmem.training.optim import OptimizerConfig, build_optimizer, build_scheduler  # noqa: F401
