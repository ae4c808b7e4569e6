"""Training losses, one per module, each testable on random tensors without a cluster."""

from ray_train.losses.infonce import gather_ids, gather_with_grad, info_nce
from ray_train.losses.masked_lm import MaskedLMLoss
from ray_train.losses.sgns import NegativeSampler, sgns_loss

__all__ = ["MaskedLMLoss", "NegativeSampler", "gather_ids", "gather_with_grad", "info_nce", "sgns_loss"]
