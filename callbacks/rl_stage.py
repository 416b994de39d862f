"""Stage-3 callback: load the stage-1/2 HMST checkpoint and switch the module into its RL phase.

In a config::

    trainer:
      callbacks:
        - class_path: memlm.callbacks.rl_stage.RLStage
          init_args: {init_checkpoint: runs/hmst_micro/version_0/checkpoints/last.ckpt, algorithm: ppo,
                      lambda_compute: 0.5, ...}

At ``setup`` (before the optimizer is built) the weights, tokenizer and memories of
``init_checkpoint`` are loaded (a missing file, another architecture or other sizes are one
``error:`` line), every parameter except the meta-controller's is frozen, gates are sampled
from the policy, and :class:`memlm.lightning_modules.hmst.rl_phase.RLPhase` takes over
``training_step`` (manual optimization: ``trainer.max_steps`` counts policy optimizer steps,
``epochs`` per rollout for PPO).
"""
from __future__ import annotations

import lightning as L

from memlm.core.checkpoint_io import read_checkpoint
from memlm.core.errors import MemLMError
from memlm.lightning_modules.hmst.stage2 import item_setting_changes
from memlm.models.hmst.policy_gradient import RewardConfig, RLConfig


def load_stage_checkpoint(module, path: str | None, stage: str, new_ok: tuple[str, ...] = ()) -> None:
    """Load weights, tokenizer and memories of an earlier-stage checkpoint into ``module`` in place.

    ``new_ok``: name prefixes of parameters this stage may add (they keep their fresh
    initialisation when the checkpoint lacks them), e.g. stage 4's ``model.critic.match.``."""
    if not path:
        raise MemLMError(f"{stage} starts from a trained HMST checkpoint: set init_checkpoint to a stage-1 or "
                         "stage-2 .ckpt (train one with configs/hmst_micro.yaml)")
    ckpt = read_checkpoint(path)
    saved = str(ckpt["memlm"].get("class_path", ""))
    want = type(module).__name__
    if saved.rpartition(".")[2] != want:
        raise MemLMError(f"{path} holds a {saved.rpartition('.')[2] or 'unknown'} checkpoint; {stage} needs a {want} "
                         "checkpoint (a stage-1 or stage-2 HMST run)")
    state = dict(ckpt["state_dict"])
    for name, p in module.state_dict().items():
        if new_ok and name not in state and name.startswith(new_ok):
            state[name] = p  # added by this stage: its own initial value
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise MemLMError(f"{path} does not fit this {stage} config ({detail}); use the model sizes it was trained "
                         "with") from None
    # the semantic items were written under these settings; read otherwise they mean something else
    changes = item_setting_changes(ckpt.get("hyper_parameters"), module)
    if changes:
        key, was, now = changes[0]
        raise MemLMError(f"{path} was trained with model.{key}={was}, this {stage} config has {now}; "
                         f"set model.{key}: {was} (its memory items were written that way)")
    module.on_load_checkpoint(ckpt)


class RLStage(L.Callback):
    """See the module docstring. Every coefficient of the algorithm and of the reward is an init arg."""

    def __init__(
        self,
        init_checkpoint: str | None = None,
        algorithm: str = "ppo",
        epochs: int = 4,
        clip: float = 0.2,
        vf_coef: float = 0.5,
        ent_coef: float = 0.01,
        returns: str = "gae",
        gamma: float = 0.0,
        gae_lambda: float = 0.95,
        normalize_advantages: bool = True,
        lambda_compute: float = 0.5,
        lambda_latency: float = 0.0,
        lambda_calibration: float = 0.0,
        rollout_steps: int = 1,
        max_grad_norm: float = 1.0,
        write_memory: bool = False,
        calib_span: int = 8,
    ) -> None:
        self.init_checkpoint = init_checkpoint
        self.rl = RLConfig(algorithm=algorithm, epochs=epochs, clip=clip, vf_coef=vf_coef, ent_coef=ent_coef,
                           returns=returns, gamma=gamma, gae_lambda=gae_lambda,
                           normalize_advantages=normalize_advantages)
        self.reward = RewardConfig(lambda_compute=lambda_compute, lambda_latency=lambda_latency,
                                   lambda_calibration=lambda_calibration)
        self.rollout_steps, self.max_grad_norm, self.write_memory = rollout_steps, max_grad_norm, write_memory
        self.calib_span = calib_span

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from memlm.lightning_modules.hmst.module import HMSTLanguageModel
        from memlm.lightning_modules.hmst.rl_phase import RLPhase

        if not isinstance(pl_module, HMSTLanguageModel):
            raise MemLMError(f"RLStage trains the HMST meta-controller; the model is a {type(pl_module).__name__}")
        load_stage_checkpoint(pl_module, self.init_checkpoint, "stage 3 (RL)")
        if trainer.gradient_clip_val:
            raise MemLMError("stage 3 clips the controller's gradient itself (RLStage max_grad_norm); "
                             "set trainer.gradient_clip_val: null")
        phase = RLPhase(self.rl, self.reward, self.rollout_steps, self.max_grad_norm, self.write_memory, self.calib_span)
        phase.freeze(pl_module)
        pl_module.rl_phase = phase
