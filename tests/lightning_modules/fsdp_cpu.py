"""Test helper: Lightning's FSDPStrategy with its two CUDA-only guards lifted, so FSDP runs on CPU (gloo).

Lightning refuses ``FSDPStrategy`` unless the accelerator is CUDA (it checks the exact type, so a
subclass passes), and torch's FSDP looks for an accelerator device unless ``device_id`` is given, so
the model is wrapped here with ``device_id=cpu`` and the same policy/sharding arguments. The full
state dict is gathered without ``offload_to_cpu``: on CPU tensors that option makes torch free the
gathered storage before it is cloned (a segfault in ``_full_post_state_dict_hook``, torch 2.13).
Everything else (sharding, all-gathers, gradient reduce-scatter, clipping, checkpoint) is
Lightning's and torch's own code path.
"""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning would warn and drop it
        return super()._setup_model(model)

    def lightning_module_state_dict(self):
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, cfg):
            return self.model.state_dict()
