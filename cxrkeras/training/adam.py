"""`GroupAdam`: Adam / AdamW with a learning-rate multiplier per variable (fastai's layer groups), decoupled weight
decay that can spare batch-norm and bias variables, a scheduled beta_1 (fastai's momentum cycling) and either
epsilon convention.

One step on a variable of group g is exactly Keras' Adam (or AdamW) run with learning rate `lr * multiplier[g]`:
    m <- m + (g - m)(1 - beta_1);  v <- v + (g^2 - v)(1 - beta_2)
    eps_style "keras":  p <- p - lr_g sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + eps)
    eps_style "fastai": p <- p - lr_g / (1 - beta_1^t) * m / (sqrt(v / (1 - beta_2^t)) + eps)
("fastai" is fastai's `adam_step` and PyTorch's Adam: eps is added after the bias correction). With weight decay
wd, every variable not exempted first decays: p <- p - lr_g * wd * p (Keras' AdamW and fastai's `weight_decay`).
With a beta_1 schedule, beta_1^t uses the current beta_1, as fastai's `debias(mom, 1 - mom, step)` does.
"""

import keras
from keras import ops

from cxrkeras.constants import EPS_STYLES


@keras.saving.register_keras_serializable(package="cxrkeras")
class GroupAdam(keras.optimizers.Optimizer):
    """Adam with per-variable learning-rate multipliers, keyed by variable path (`variable.path`, "layer/name").

    lr_multipliers: {path: multiplier}; variables not listed get 1. weight_decay: decoupled (None or 0: none).
    no_decay: paths spared by the weight decay. beta_1: a float or a schedule of the iteration (e.g.
    `cxrkeras.training.schedules.one_cycle_beta_1`). eps_style: "keras" or "fastai" (see the module docstring).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, eps_style="keras",
                 weight_decay=None, lr_multipliers=None, no_decay=(), clipnorm=None, clipvalue=None,
                 global_clipnorm=None, name="group_adam", **kwargs):
        if eps_style not in EPS_STYLES:
            raise ValueError(f"eps_style must be one of {EPS_STYLES}, got {eps_style!r}")
        # the base class' weight decay is not used (it would decay every group at the base learning rate)
        super().__init__(learning_rate=learning_rate, name=name, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, **kwargs)
        if isinstance(beta_1, dict):
            beta_1 = keras.saving.deserialize_keras_object(beta_1)
        self.beta_1, self.beta_2, self.epsilon = beta_1, float(beta_2), float(epsilon)
        self.eps_style = eps_style
        self.decoupled_weight_decay = float(weight_decay or 0.0)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_decay = sorted(str(p) for p in no_decay)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        spared = set(self.no_decay)
        self._multiplier = [self.lr_multipliers.get(v.path, 1.0) for v in var_list]
        self._decays = [v.path not in spared for v in var_list]

    def current_beta_1(self):
        beta_1 = self.beta_1
        return beta_1(self.iterations) if callable(beta_1) else beta_1

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype) * self._multiplier[index]
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.current_beta_1(), dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        if self.decoupled_weight_decay and self._decays[index]:
            self.assign_sub(variable, variable * (lr * self.decoupled_weight_decay))
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, (gradient - m) * (1.0 - beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1.0 - beta_2))
        debias_1 = 1.0 - ops.power(beta_1, step)
        debias_2 = 1.0 - ops.power(beta_2, step)
        if self.eps_style == "keras":
            update = m * (lr * ops.sqrt(debias_2) / debias_1) / (ops.sqrt(v) + self.epsilon)
        else:
            update = m * (lr / debias_1) / (ops.sqrt(v / debias_2) + self.epsilon)
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        beta_1 = self.beta_1
        if callable(beta_1):
            beta_1 = keras.saving.serialize_keras_object(beta_1)
        config.update(beta_1=beta_1, beta_2=self.beta_2, epsilon=self.epsilon, eps_style=self.eps_style,
                      weight_decay=self.decoupled_weight_decay, lr_multipliers=dict(self.lr_multipliers),
                      no_decay=list(self.no_decay))
        return config
