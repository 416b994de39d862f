"""MemLM's LightningCLI: run directories, default loggers and checkpoints, linked vocab size.

Runs land in ``runs/<config-stem>/version_N/`` (config.yaml, checkpoints/last.ckpt and the
best checkpoint, logger output, analysis images). ``fit --ckpt_path last`` resumes the
newest version of the same run name instead of starting a new one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI

from memlm.callbacks.checkpointing import FinalLastCheckpoint
from memlm.callbacks.histograms import GateHistograms
from memlm.callbacks.progress import StepProgress
from memlm.callbacks.summary import MemLMModelSummary
from memlm.callbacks.slurm_requeue import SlurmRequeue, resume_checkpoint
from memlm.apps.run_info import run_metadata
from memlm.callbacks.throughput import TokenThroughput
from memlm.core.errors import MemLMError

RUN_DIR_ENV = "MEMLM_RUN_DIR"


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def next_version(root: Path) -> int:
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


def _set_exit_on_error(parser, value: bool) -> None:
    parser.exit_on_error = value
    action = getattr(parser, "_subcommands_action", None)
    for sub in (getattr(action, "_name_parser_map", None) or {}).values():
        _set_exit_on_error(sub, value)


def _one_line_parse_error(message: str) -> str:
    """Condense jsonargparse's multi-line report to its most specific cause, on one line."""
    lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments; see python train.py fit --help"
    head = lines[0].rstrip(":")
    for i, ln in enumerate(lines):
        if ln.startswith("Problem with given class_path"):
            detail = []
            for nxt in lines[i + 1 : i + 4]:
                if nxt.startswith(("Expected a <class 'NoneType'>", "Given value")):
                    break
                detail.append(nxt)
            cause = f"{ln.rstrip(':')}: {' '.join(detail)}" if detail else ln
            import_problem = any(w in cause for w in ("has no attribute", "No module named", "import"))
            hint = "check the class_path (module.ClassName)" if import_problem else "see python train.py fit --help"
            return f"{head}: {cause[:400]}; {hint}"
    rest = [ln for ln in lines[1:] if not ln.startswith(("Given value", "Subtypes:", "Errors:"))]
    text = f"{head}: {'; '.join(rest[:2])}" if rest else head
    return f"{text[:400]}; see python train.py fit --help"


def _check_trainer_limits(trainer) -> None:
    """``trainer.max_steps`` / ``max_epochs``: -1 means no limit (and max_epochs None, Lightning's default);
    0 would silently train nothing and below -1 Lightning fails with a traceback, so both are user errors."""
    for key in ("max_steps", "max_epochs"):
        value = trainer.get(key)
        if value is not None and (value == 0 or value < -1):
            raise MemLMError(f"trainer.{key} must be >= 1, or -1 for no limit, got {value}")


def _user_error_in(exc: BaseException) -> BaseException | None:
    """The MemLMError (or Lightning MisconfigurationException) that jsonargparse wrapped while instantiating."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (MemLMError, MisconfigurationException)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _appending_writer(log_dir: str):
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        """Keeps an existing metrics.csv (Lightning's writer deletes it) and appends to it."""

        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                    header = fh.readline().strip()
                self.metrics_keys = sorted(k for k in header.split(",") if k)

    return AppendingWriter(log_dir=log_dir)


def _appending_csv_logger_class():
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingCSVLogger(CSVLogger):
        """CSV logger for a resumed run: the curve before the checkpoint stays in metrics.csv."""

        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _appending_writer(self.log_dir)
            return self._experiment

    return AppendingCSVLogger


class MemLMCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        self.run_dir: Path | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--run.name", type=str | None, default=None, help="run name (default: config file stem)")
        parser.add_argument("--run.root", type=str, default="runs", help="directory holding all runs")
        parser.add_argument("--run.version", type=str | None, default=None, help="version directory (default: next version_N)")
        parser.add_argument(
            "--run.logger", type=list[str], default=["wandb"],
            help="default loggers when trainer.logger is not given: any of wandb, csv, tensorboard, none",
        )
        parser.add_argument("--run.wandb_project", type=str, default="memlm")
        parser.add_argument("--run.num_threads", type=int | None, default=None,
                            help="torch intra-op CPU threads (default: torch's choice; 1 helps on oversubscribed CPUs)")
        parser.add_argument("--run.progress_every_n_steps", type=int, default=50,
                            help="when stdout is not a terminal: a progress line every N optimizer steps")
        parser.add_argument("--run.progress_every_s", type=float, default=30.0,
                            help="when stdout is not a terminal: a progress line at least every T seconds")
        parser.add_argument("--run.skip_memory_check", type=bool, default=False,
                            help="start even when the memory pre-flight estimates more than the free memory")
        parser.add_argument("--run.ckpt_every_n_steps", type=int | None, default=None,
                            help="also write last.ckpt every N training steps (default: after each validation)")

    def parse_arguments(self, parser, args) -> None:
        """Parse; a bad option or class_path becomes one ``error:`` line (not usage + a multi-line report)."""
        from jsonargparse import ArgumentError

        _set_exit_on_error(parser, False)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise MemLMError(_one_line_parse_error(str(exc))) from exc

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the checkpoint's hyperparameters here; a corrupt or foreign file is a user error."""
        from jsonargparse import ArgumentError

        from memlm.checkpoint import read_checkpoint

        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(str(ckpt)).is_file():
            read_checkpoint(ckpt)  # MemLMError if unreadable or not written by MemLM
        try:
            super()._parse_ckpt_path()
        except ArgumentError as exc:
            raise MemLMError(f"checkpoint {ckpt} does not fit this config: {_one_line_parse_error(str(exc))}") from exc

    # -- run directory ----------------------------------------------------------------------
    def _sub_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._sub_config()
        _check_trainer_limits(cfg.trainer)  # before a run directory is made
        if self.subcommand == "fit":
            self._memory_preflight(cfg)  # before any memory is allocated for the model
        if cfg.run.num_threads:
            import torch

            torch.set_num_threads(int(cfg.run.num_threads))
        if os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
            self.run_dir = Path(os.environ[RUN_DIR_ENV])  # DDP child: reuse rank 0's directory
            cfg.trainer.default_root_dir = str(self.run_dir)
            self._resolve_resume(cfg)
            return
        if cfg.trainer.default_root_dir:
            self.run_dir = Path(cfg.trainer.default_root_dir)
        else:
            name = cfg.run.name
            if not name:
                configs = cfg.get("config") or []
                name = Path(str(configs[0])).stem if configs else "run"
            root = Path(cfg.run.root) / name
            version = cfg.run.version
            if version is None:
                n = next_version(root)
                resuming = str(cfg.get("ckpt_path") or "") == "last"
                version = f"version_{max(0, n - 1) if resuming else n}"
            self.run_dir = root / version
            cfg.trainer.default_root_dir = str(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(self.run_dir)
        self._resolve_resume(cfg)

    def _memory_preflight(self, cfg) -> None:
        """Estimate training memory on the meta device and compare it with the free memory."""
        from memlm.apps import preflight

        if cfg.run.skip_memory_check or not cfg.get("model") or not cfg.get("data"):
            return
        init = cfg.model.init_args.as_dict() if cfg.model.get("init_args") is not None else {}
        data = cfg.data.init_args.as_dict() if cfg.data.get("init_args") is not None else {}
        init.setdefault("vocab_size", None)
        if init["vocab_size"] is None:
            init["vocab_size"] = int(data.get("vocab_size") or 256)
        module = preflight.build_on_meta(cfg.model.class_path, init)
        if module is None:
            return
        trainer = cfg.trainer
        devices = trainer.get("devices")
        per_host = int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1
        world = per_host * int(trainer.get("num_nodes") or 1)
        est = preflight.estimate(module, int(data.get("batch_size") or 1), int(data.get("block_size") or 1),
                                 str(trainer.get("precision") or "32-true"), str(trainer.get("strategy") or "auto"), world)
        free, where = preflight.free_memory(str(trainer.get("accelerator") or "auto"))
        warning = preflight.check(est, free, where, devices_here=per_host)
        if warning:
            preflight.say(warning)

    def _resolve_resume(self, cfg) -> None:
        """A requeued SLURM job resumes from the newest of hpc_ckpt_<n>.ckpt and last.ckpt."""
        if self.subcommand == "fit":
            cfg.ckpt_path = resume_checkpoint(self.run_dir, cfg.get("ckpt_path"))

    def _wandb_run_id(self) -> str:
        """One W&B run per run directory: a resumed or requeued job continues the same run."""
        import secrets

        path = self.run_dir / "wandb_run_id"
        if path.is_file():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, path)
        return run_id

    def _default_loggers(self, kinds: list[str]):
        from lightning.pytorch import loggers

        out = []
        for kind in kinds:
            kind = kind.lower()
            if kind == "none":
                return False
            if kind == "csv":
                resuming = bool(self._sub_config().get("ckpt_path"))
                cls = _appending_csv_logger_class() if resuming else loggers.CSVLogger
                out.append(cls(save_dir=str(self.run_dir), name="", version=""))
            elif kind == "tensorboard":
                out.append(loggers.TensorBoardLogger(save_dir=str(self.run_dir), name="", version="", default_hp_metric=False))
            elif kind == "wandb":
                out.append(self._wandb_logger())
            else:
                raise MemLMError(f"unknown --run.logger {kind!r}: use wandb, csv, tensorboard or none")
        return out

    def _wandb_logger(self):
        from lightning.pytorch.loggers import WandbLogger

        cfg = self._sub_config()
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _wandb_has_key()
        if offline and os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("MEMLM_QUIET") != "1":
            print(
                f"W&B: no API key configured, logging offline under {self.run_dir}/wandb; "
                f"upload later with: wandb sync {self.run_dir}/wandb/offline-run-*"
            )
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            config = cfg.clone().as_dict()
        except Exception:
            config = {}
        # code version, tokenizer, parameter counts, hardware: what dashboards filter and group by
        config["memlm"] = run_metadata(self.model, self.datamodule, cfg.trainer, self.run_dir.parent.name, self.subcommand)
        return WandbLogger(
            project=cfg.run.wandb_project,
            name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
            save_dir=str(self.run_dir),
            offline=offline,
            config=config,
            id=self._wandb_run_id(),
            resume="allow",
            group=config["memlm"]["architecture"],
            tags=config["memlm"]["tags"],
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        cfg = self._sub_config()
        if config.get("logger") in (None, True):
            config["logger"] = self._default_loggers(cfg.run.logger)
        cbs = config.get("callbacks") or []
        cbs = cbs if isinstance(cbs, list) else [cbs]
        module = self.model
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in cbs):
            monitor = getattr(module, "checkpoint_monitor", "val/loss")
            ckpt_dir = str(self.run_dir / "checkpoints")
            if monitor:
                cbs.append(
                    ModelCheckpoint(
                        dirpath=ckpt_dir,
                        filename="best-{step}",
                        monitor=monitor,
                        mode="min" if ("loss" in monitor or "bpb" in monitor or "ppl" in monitor) else "max",
                        save_top_k=1,
                        save_last=False,
                    )
                )
            # Lightning's save_last only rewrites last.ckpt when a top-k save happens in the same
            # step (so it goes stale once val/loss stops improving), and a monitored checkpoint
            # waits for its metric. last.ckpt therefore has its own unmonitored callback: written
            # after every validation, or every N training steps with --run.ckpt_every_n_steps.
            cbs.append(
                ModelCheckpoint(
                    dirpath=ckpt_dir,
                    filename="last",
                    monitor=None,
                    save_top_k=1,
                    enable_version_counter=False,
                    every_n_train_steps=cfg.run.ckpt_every_n_steps,
                )
            )
            cbs.append(FinalLastCheckpoint(self.run_dir / "checkpoints" / "last.ckpt"))
        if not any(isinstance(c, TokenThroughput) for c in cbs):
            cbs.append(TokenThroughput())
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in cbs):
            cbs.append(StepProgress(every_n_steps=cfg.run.progress_every_n_steps, every_s=cfg.run.progress_every_s))
        if config.get("enable_model_summary", True) is not False and not any(isinstance(c, ModelSummary) for c in cbs):
            cbs.append(MemLMModelSummary())
        if not any(isinstance(c, SlurmRequeue) for c in cbs):
            cbs.append(SlurmRequeue())
        if hasattr(module, "last_gate_decision") and not any(isinstance(c, GateHistograms) for c in cbs):
            cbs.append(GateHistograms())  # HMST's gate distributions on the dashboard (W&B, TensorBoard)
        config["callbacks"] = cbs
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            # jsonargparse reports a class that raised in __init__ as a multi-line ValueError about
            # Union subtypes; the module's own one-line MemLMError is the message the user needs
            cause = _user_error_in(exc)
            if cause is None:
                raise
            raise MemLMError(str(cause).strip().splitlines()[0]) from exc
        model, data = self.model, self.datamodule
        limit = getattr(model, "max_seq_len", None)
        block = getattr(data, "block_size", None)
        if limit is not None and block is not None and block > limit:
            raise MemLMError(
                f"data.block_size {block} is longer than the model supports ({limit}); "
                f"lower --data.block_size or raise the model's block_size"
            )
        ckpt = self._sub_config().get("ckpt_path") if self.subcommand else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not Path(str(ckpt)).is_file():
            raise MemLMError(f"checkpoint not found: {ckpt}")
        if ckpt == "last" and not (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            raise MemLMError(f"nothing to resume: no {self.run_dir / 'checkpoints' / 'last.ckpt'}; drop --ckpt_path last")

    def after_fit(self) -> None:
        trainer = self.trainer
        # finish the W&B run here rather than at interpreter exit: under srun the job step ends
        # with the process, and an offline run's last history rows must be on disk for `wandb sync`
        for logger in trainer.loggers:
            run = getattr(logger, "_experiment", None)
            if run is not None and type(logger).__name__ == "WandbLogger" and hasattr(run, "finish"):
                run.finish()
        ckpt_cb = trainer.checkpoint_callback
        last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb and ckpt_cb.dirpath else None
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k in ("val/loss", "val/ppl", "val/bpb", "val/acc"))
        print(f"\nrun directory: {self.run_dir}")
        if last is not None and last.is_file():
            print(f"checkpoint: {last}")
            best = getattr(ckpt_cb, "best_model_path", "")
            if best and Path(best).name != "last.ckpt":
                print(f"best checkpoint: {best}")
        if summary:
            print(f"final validation: {summary}")
