"""Training: token caches (`tokens`), data order (`streams`), one adaptation step (`step`), the
backbone pretraining loop (`pretrain`) and the adaptation trainer (`train`), built from small
modules by concern: `optim`, `config_io`, `checkpoints`, `metrics`, `interrupt`. Device and
precision come from `longmem.runtime`."""
