"""The momentum (EMA) copy of the model that provides queue features and distillation targets."""

import copy

import torch
from torch import nn


class MomentumModel:
    """An EMA copy of the trainable weights. Frozen sub-modules are shared with the online model, not copied:
    their EMA equals themselves, and BLIP-2's ViT-g is a billion parameters. Sub-modules named in `unused` (the parts
    the momentum model never runs, e.g. the SIM head: it only embeds) are neither copied nor averaged."""

    def __init__(self, model: nn.Module, momentum: float, unused: tuple[str, ...] = (), prefix: str = "momentum.",
                 warmup: bool = False):
        self.momentum = momentum
        self.prefix = prefix  # of its checkpoint keys
        # With warmup the factor grows as (1 + n) / (10 + n) up to `momentum` (timm's model EMA), so an average of a
        # short run is not dominated by the random initial weights.
        self.warmup = warmup
        self.updates = 0
        frozen = {name for name, module in model.named_children() if not any(p.requires_grad for p in module.parameters())}
        set_aside = {name: getattr(model, name) for name in frozen | set(unused)}
        for name in set_aside:  # keep the big frozen towers (and unused parts) out of deepcopy
            setattr(model, name, nn.Identity())
        try:
            self.model = copy.deepcopy(model)
        finally:
            for name, module in set_aside.items():
                setattr(model, name, module)
        for name in frozen - set(unused):
            setattr(self.model, name, set_aside[name])
        self.model.requires_grad_(False)
        self.model.eval()
        if hasattr(self.model, "unpadded_speech_inference"):  # batches as the online model sees them, not clip by clip
            self.model.unpadded_speech_inference = False
        if hasattr(self.model, "test_time_views"):  # one view, the one training sees
            self.model.test_time_views = False
        self._pairs = [
            (name, parameter, dict(self.model.named_parameters())[name])
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and name.split(".")[0] not in unused
        ]

    @torch.no_grad()
    def update(self) -> None:
        factor = min(self.momentum, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.momentum
        self.updates += 1
        online = [pair[1].detach() for pair in self._pairs]
        ema = [pair[2] for pair in self._pairs]
        torch._foreach_mul_(ema, factor)
        torch._foreach_add_(ema, online, alpha=1 - factor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.prefix}{name}": ema for name, _, ema in self._pairs}
        if self.warmup:
            state[f"{self.prefix}updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name, _, _ in self._pairs if f"{self.prefix}{name}" not in state]
        if missing:
            raise ValueError(f"checkpoint lacks {self.prefix.rstrip('.')} weights for {len(missing)} parameters (first: {missing[:3]})")
        with torch.no_grad():
            for name, _, ema in self._pairs:
                ema.copy_(state[f"{self.prefix}{name}"])
        if self.warmup:
            self.updates = int(state[f"{self.prefix}updates"])

    @torch.no_grad()
    def copy_to_online(self) -> None:
        """Write the averages into the online model's parameters (a weight EMA's end of training)."""
        for _, online, ema in self._pairs:
            online.copy_(ema)
