"""Knowledge-distillation building blocks: losses, teacher selection, block swapping."""

from qflax.distill.losses import accuracy
from qflax.distill.losses import attention_map
from qflax.distill.losses import attention_transfer_loss
from qflax.distill.losses import cross_entropy
from qflax.distill.losses import hint_loss
from qflax.distill.losses import kd_kl
from qflax.distill.losses import min_logit_ensemble
from qflax.distill.losses import pairwise_kl
from qflax.distill.losses import stage_outputs
from qflax.distill.swapping import MASK_MODES
from qflax.distill.swapping import SCHEDULES as SWAP_SCHEDULES
from qflax.distill.swapping import swap_mask
from qflax.distill.swapping import swap_probability
from qflax.distill.teachers import STRATEGIES as TEACHER_STRATEGIES
from qflax.distill.teachers import TeacherStats
from qflax.distill.teachers import init_teacher_stats
from qflax.distill.teachers import select_teacher
from qflax.distill.teachers import update_teacher_stats
