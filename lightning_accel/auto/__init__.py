"""AutoCompress: the user names the goal (faster, smaller, how much metric to give), the package measures the model on
this machine, plans the recipe and runs it through its own callbacks.

* :mod:`lightning_accel.auto.plan`: the decision as data and pure functions (targets, greedy per-group amounts).
* :mod:`lightning_accel.auto.measure`: what is measured on the model (group sensitivity, MACs, deployed latency).
* :mod:`lightning_accel.auto.callbacks`: :class:`AutoCompress`, when the Trainer measures, plans, runs and answers.
"""

from lightning_accel.auto.callbacks import TECHNIQUES, AutoCompress
from lightning_accel.auto.plan import AutoPlan, GroupCost, LatencyModel, choose_amounts, plan_targets

__all__ = ["TECHNIQUES", "AutoCompress", "AutoPlan", "GroupCost", "LatencyModel", "choose_amounts", "plan_targets"]
