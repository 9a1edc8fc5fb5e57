"""The training loop: a task model (tasks.py: BlipForPretraining, BlipForRetrieval,
BlipForCaptioning) under a DeepSpeed ZeRO engine.

One micro-batch (`forward_backward`): cast inputs to the engine's dtype, EMA-update the fp32
momentum encoders (outside the engine, see momentum.py), forward (losses, enqueue), all-reduce
a small vector (non-finite flags, losses, token count) so every rank takes the same decision,
then backward or stop/skip. `engine.step()` applies AdamW at accumulation boundaries, with the
learning rate of the original schedule set just before. Checkpoints: checkpoint.py.

BLIP semantics are kept under data parallelism: ITC in-batch columns and hard negatives are per
rank; the queue receives the all-gathered momentum features of every rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from blipfast import flops as flop_formulas
from blipfast.config import ConfigError
from blipfast.data.collate import MappedLoader
from blipfast.models.blip import TEMP_MAX, TEMP_MIN

from . import checkpoint, schedule
from .config import RunConfig, build_deepspeed_config, save_resolved
from .logging import RunLogger, peak_flops, truncate_metrics
from .momentum import (MomentumState, NoMomentum, autocast_context, momentum_model_kwargs,
                       register_zero3_external_params)
from .tasks import get_task

LOSS_NAMES = ("loss_itc", "loss_itm", "loss_lm")  # pre-training's (each task has its own: tasks.py)


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/inf and train.nan_policy is 'stop'."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Tuple[int, int, int]:
    """(rank, world size, local rank). Works under the deepspeed launcher, torchrun, or plain python."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python train.py`: a one-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            if "OMP_NUM_THREADS" not in os.environ:
                # Ranks sharing a CPU: one slice of the cores each, not all of them each.
                local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference at start-up
            # (over a minute of C++ compilation on a fresh machine); training never uses it.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


@dataclass
class MicroResult:
    losses: Dict[str, float]  # mean over ranks
    local: Dict[str, float]  # this rank's
    tokens: float  # text tokens (attention mask) over all ranks
    skipped: bool = False
    nonfinite: Tuple[str, ...] = ()
    stop: Optional[str] = None  # SIGTERM / SIGUSR1 reached some rank (all-reduced: every rank agrees)


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    skipped: int = 0  # micro-batches skipped by nan_policy=skip so far
    history: list = field(default_factory=list)


class Trainer:
    """Builds everything from a RunConfig; `fit()` trains, checkpoints and evaluates.

    loader / tokenizer / eval_set default to blipfast.data's; tests pass their own loader (any
    object with len() and .epoch(epoch, start_step) yielding dict batches) and may fix hard
    negatives with negatives_fn(epoch, batch_index, rank) -> (neg_img, neg_txt) or None."""

    def __init__(self, run: RunConfig, *, loader=None, tokenizer=None, eval_set=None,
                 negatives_fn: Optional[Callable] = None, resume: bool = False):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.run, cfg = run, run.train
        self.rank, self.world, self.local_rank = init_distributed()
        run.check_world(self.world)  # before any other work
        self.output_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        if resume:
            self._check_resume(run)  # before anything is written
        try:  # a clear error now, not a traceback from the first write
            os.makedirs(self.output_dir, exist_ok=True)
            probe = os.path.join(self.output_dir, f".write_test.{socket.gethostname()}.{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"{run.source}: train.output_dir {self.output_dir} cannot be written: "
                              f"{e.strerror or e}") from None
        self.negatives_fn = negatives_fn
        self.eval_set = eval_set

        acc = get_accelerator()
        self.device = torch.device(acc.device_name(self.local_rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        self.tokenizer = tokenizer if tokenizer is not None or loader is not None else self._build_tokenizer()
        self.task = get_task(run.task, run.source, run)
        own_data = loader is None
        if own_data:
            loader = self.task.build_loader(run, self.tokenizer, self.rank, self.world, self.device)
        transform = self.task.batch_transform(self.tokenizer)  # e.g. the caption prompt, for any loader
        self.loader = loader if transform is None else MappedLoader(loader, transform)
        if cfg.eval.enabled and eval_set is None and own_data:
            self.task.check_eval_data(run)  # a missing held-out set fails now, not after training
        self.batches_per_epoch = (len(self.loader) // cfg.grad_accum) * cfg.grad_accum
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"{run.source}: an epoch has {len(self.loader)} batches per rank, fewer than train.grad_accum "
                f"{cfg.grad_accum}: the dataset is too small for batch_size {cfg.batch_size} x world size {self.world}"
            )
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum

        # Same seed on every rank for the weights (the momentum copy and the queues are not
        # broadcast by DeepSpeed), then seed + rank for everything random in training.
        self.ds_config = build_deepspeed_config(run, self.world)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        seed_everything(cfg.seed)
        model = self.task.build_model(run.model, self.tokenizer, **momentum_model_kwargs(self.task, self.stage))
        if cfg.init_from:
            self._init_from(model, cfg.init_from)
        self.momentum = (MomentumState(model, self.stage, self.device) if self.task.has_momentum
                         else NoMomentum())
        if self.stage == 3 and hasattr(model, "text_decoder"):
            register_zero3_external_params(model)
        seed_everything(cfg.seed + self.rank)

        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(schedule.param_groups(model, cfg), lr=cfg.warmup_lr,
                                      betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, **fused)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        self.momentum.broadcast_from_rank0()
        self.model = self.engine.module
        self.model.train()
        self.compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.position = Position()
        self.last_saved: Optional[str] = None  # tag of the newest checkpoint this run saved or resumed from
        self.logger: Optional[RunLogger] = None
        self._signal: Optional[int] = None  # SIGTERM / SIGUSR1 received (handlers: fit)
        if self.rank == 0:
            save_resolved(run, self.ds_config, self.output_dir)

    # -- building blocks ------------------------------------------------------------------------

    def _build_tokenizer(self):
        from blipfast.data.tokenizer import build_demo_tokenizer, load_tokenizer

        t = self.run.data.tokenizer
        return build_demo_tokenizer() if t == "demo" else load_tokenizer(t)

    def _init_from(self, model, path: str) -> None:
        """Load initial weights (every rank, before the engine): a .pth file in the official /
        blipfast layout, or a training output_dir of any task (its newest committed checkpoint). Keys the
        task model lacks (e.g. the pre-training decoder in a retrieval model) are skipped."""
        from blipfast.convert import load_original_checkpoint, load_original_state_dict

        log = self.rank == 0
        if not os.path.exists(path):
            if self.run.train.init_optional:
                if log:
                    print(f"train.init_from: {path} not found; training task {self.task.name} FROM SCRATCH "
                          f"(train.init_optional=true)", flush=True)
                return
            raise ConfigError(f"{self.run.source}: train.init_from {path} does not exist")
        kw = dict(ignore_unexpected=self.task.init_ignore, allow_missing=self.task.init_allow_missing)
        if os.path.isdir(path):
            from .export import consolidated_state_dict

            sd = consolidated_state_dict(path)  # the model that run trained (any task), checked strictly
            load_original_state_dict(model, sd, **kw)
        else:
            load_original_checkpoint(model, path, **kw)
        if log:
            print(f"train.init_from: initialised {type(model).__name__} from {path}", flush=True)

    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    # -- one micro-batch -----------------------------------------------------------------------

    def forward_backward(self, batch: Dict, epoch: int, index: int) -> MicroResult:
        cfg = self.run.train
        images = batch["images"].to(self.device, dtype=self.compute_dtype, non_blocking=True)
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        B = images.shape[0]
        if B != cfg.batch_size:
            raise RuntimeError(f"batch of {B} at epoch {epoch} batch {index}; the loader must drop the last "
                               f"incomplete batch (the queue needs train.batch_size x world size per step)")
        negatives = self.negatives_fn(epoch, index, self.rank) if self.negatives_fn else None
        if negatives is not None:
            negatives = tuple(n.to(self.device) for n in negatives)
        alpha = schedule.alpha(cfg, epoch, index, self.batches_per_epoch)
        snap = self.momentum.snapshot_queue(B * self.world) if cfg.nan_policy == "skip" else None
        names = self.task.loss_names
        n = len(names)

        self.momentum.update()
        with autocast_context(self.device, cfg.precision):
            loss, parts = self.task.forward(
                self.engine, {**batch, "images": images, "input_ids": ids, "attention_mask": mask}, alpha,
                negatives)
        local = torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in names])
        flags = (~torch.isfinite(local[1:])).float()
        stop = local.new_tensor([float(self._signal == s) for s in self.STOP_SIGNALS])
        vec = torch.cat([flags, local, stop, mask.sum().float()[None]])  # (n flags, 1 + n losses, signals, tokens)
        vec = self._all_reduce(vec.clone()).cpu()  # one small collective per micro-batch
        got = [s for s, f in zip(self.STOP_SIGNALS, vec[2 * n + 1:-1]) if f > 0]
        stop_any = got[0].name if got else None
        local_cpu = local.cpu()
        local_d = {"loss": float(local_cpu[0]), **{k: float(v) for k, v in zip(names, local_cpu[1:])}}
        bad = tuple(k for k, f in zip(names, vec[:n]) if f > 0)
        if bad:
            where = (f"non-finite {', '.join(bad)} at optimizer step {self.global_step} (epoch {epoch}, batch "
                     f"{index}) on {int(vec[:n].max())} of {self.world} rank(s)")
            if cfg.nan_policy == "stop":
                raise NonFiniteLoss(
                    where + ". Stopping (train.nan_policy=stop) before the update, so the last checkpoint "
                    "is intact: resume with --resume (maybe with a lower train.lr), or set train.nan_policy=skip")
            self.momentum.restore_queue(snap)  # undo this micro-batch's enqueue on every rank
            self.position.skipped += 1
            if self.logger:
                self.logger.print(f"WARNING: {where}: skipped (train.nan_policy=skip; {self.position.skipped} so far)")
            return MicroResult({}, local_d, float(vec[-1]), skipped=True, nonfinite=bad, stop=stop_any)
        self.engine.backward(loss)
        mean = vec[n:2 * n + 1] / self.world
        losses = {"loss": float(mean[0]), **{k: float(v) for k, v in zip(names, mean[1:])}}
        return MicroResult(losses, local_d, float(vec[-1]), stop=stop_any)

    def optimizer_step(self, epoch: int, index: int) -> bool:
        """engine.step() for this micro-batch with the schedule's lr; True at an optimizer step."""
        lr = schedule.learning_rate(self.run.train, epoch, index // self.run.train.grad_accum)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self._clamp_temperature()
        return boundary

    def _gathered(self, params):
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def temperature(self) -> float:
        if not hasattr(self.model, "temp"):  # task caption: no contrastive temperature
            return float("nan")
        t = self.model.temp
        with self._gathered([t]):
            return float(t.detach().float().reshape(-1)[0])

    def _clamp_temperature(self) -> None:
        """The forward clamps the module's temp in place, as the original; under DeepSpeed that
        copy is overwritten from the optimizer's master weight after each step, so clamp the
        master too when it left [0.001, 0.5] (rare)."""
        if not hasattr(self.model, "temp"):
            return
        value = self.temperature()
        if TEMP_MIN <= value <= TEMP_MAX:
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        t = self.model.temp
        master = safe_get_full_fp32_param(t)
        if master is not None:
            safe_set_full_fp32_param(t, master.clamp(TEMP_MIN, TEMP_MAX))

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> str:
        meta = {"epoch": self.position.epoch, "batch": self.position.batch, "global_step": self.global_step,
                "skipped": self.position.skipped, "world_size": self.world, "zero_stage": self.stage}
        if checkpoint.is_committed(os.path.join(self.ckpt_dir, checkpoint.tag_for(self.global_step))):
            self.last_saved = checkpoint.tag_for(self.global_step)  # committed already: kept as it is
            return self.last_saved
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.global_step, meta, self.momentum.state_dict(),
                              self.run.train.keep_last)
        self.last_saved = tag
        if self.logger:
            self.logger.print(f"checkpoint {os.path.join(self.ckpt_dir, tag)} committed "
                              f"(epoch {meta['epoch']}, batch {meta['batch']}, step {meta['global_step']})")
        return tag

    def _check_resume(self, run: RunConfig) -> None:
        """--resume: compare the run's saved resolved config (and the newest checkpoint's world size)
        with this one; changes to the math or the data position raise one ConfigError listing
        them all, safe changes are printed. Nothing is written before this."""
        from .config import load_run_config, resume_changes

        tag = checkpoint.find_latest(self.ckpt_dir)
        saved_path = os.path.join(self.output_dir, "config.yaml")
        if tag is None or not os.path.isfile(saved_path):
            return  # nothing to continue: resume() starts from scratch
        try:
            saved = load_run_config(saved_path)
        except ConfigError as e:
            raise ConfigError(f"--resume: cannot read the run's saved configuration: {e}") from None
        meta = checkpoint.read_meta(self.ckpt_dir, tag)
        refused, allowed = resume_changes(saved, run, meta.get("world_size"), self.world)
        if refused:
            raise ConfigError(
                f"--resume: {self.output_dir} (checkpoint {tag}) cannot continue with this configuration: "
                f"these changes alter the math or the data position: {'; '.join(refused)}. Undo them, or "
                f"start a new run in another train.output_dir (train.init_from=DIR takes its weights)")
        if allowed and self.rank == 0:
            print(f"--resume: continuing {tag} with these changes (they do not alter the math or the data "
                  f"position): {'; '.join(allowed)}", flush=True)

    def resume(self) -> Optional[str]:
        """Load the newest committed checkpoint of output_dir (ignoring torn ones); None if none."""
        tag = checkpoint.find_latest(self.ckpt_dir)
        if tag is None:
            if self.rank == 0:
                print(f"--resume: no committed checkpoint in {self.ckpt_dir}; starting from scratch", flush=True)
            return None
        meta = checkpoint.read_meta(self.ckpt_dir, tag)
        if meta.get("world_size") != self.world:
            raise ConfigError(f"--resume: checkpoint {tag} was saved by {meta.get('world_size')} ranks, this run "
                              f"has {self.world}: resume with the same number of ranks")
        state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self.momentum.load_state_dict(state["momentum"])
        self.position = Position(epoch=meta["epoch"], batch=meta["batch"], skipped=meta.get("skipped", 0))
        self.last_saved = tag
        checkpoint.set_rng_state(state["rng"])  # last: nothing above may draw random numbers after it
        if self.rank == 0:
            truncate_metrics(self.output_dir, meta["global_step"])  # those steps are about to run again
            print(f"resumed from {os.path.join(self.ckpt_dir, tag)}: epoch {meta['epoch']}, batch "
                  f"{meta['batch']}, step {meta['global_step']}", flush=True)
        return tag

    # -- preemption ----------------------------------------------------------------------------

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on after the current step (forward_backward all-reduces it)

    def _install_signal_handlers(self) -> Dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        return {s: signal.signal(s, self._on_signal) for s in self.STOP_SIGNALS}

    @staticmethod
    def _restore_signal_handlers(previous: Dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    # -- the loop ------------------------------------------------------------------------------

    def total_steps(self) -> int:
        cfg = self.run.train
        total = cfg.epochs * self.steps_per_epoch
        return min(total, cfg.max_steps) if cfg.max_steps else total

    def fit(self) -> Dict:
        cfg = self.run.train
        total = self.total_steps()
        # blipfast.flops, the benchmarks' count; captions are counted at max_text_len, so under
        # exact work (which skips padding) this is an upper bound of the arithmetic done.
        flops = flop_formulas.pretrain_step(self.run.model, cfg.batch_size).model_flops / cfg.batch_size
        # MFU is reported for pre-training only (the FLOP count is the pre-training model's).
        peak = peak_flops(cfg.precision) if self.task.name == "pretrain" else None
        self.logger = RunLogger(self.output_dir, self.rank, total, self.global_step,
                                cfg.progress_bar, flops, peak, self.world)
        log = self.logger
        if self.rank == 0:
            log.print(f"training (task {self.task.name}): {self.world} rank(s), ZeRO stage {self.stage}, {cfg.precision}, "
                      f"batch {cfg.batch_size}/rank x {cfg.grad_accum} accumulation, {self.steps_per_epoch} "
                      f"steps/epoch ({len(self.loader)} batches/rank; the last incomplete batch of each epoch "
                      f"is dropped), {total} steps in all, device {self.device}")
        done = self.global_step >= total
        stop = None  # a preemption signal's name once it reached some rank: stop at the next optimizer step
        previous = self._install_signal_handlers()
        acc: Dict[str, float] = {}
        n_acc, tokens, wait = 0, 0.0, 0.0
        while not done and self.position.epoch < cfg.epochs:
            epoch = self.position.epoch
            it = iter(self.loader.epoch(epoch, start_step=self.position.batch))
            while self.position.batch < self.batches_per_epoch:
                i = self.position.batch
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    raise RuntimeError(f"the loader ended after {i} batches in epoch {epoch}, but len() said "
                                       f"{len(self.loader)}") from None
                wait += time.perf_counter() - t0
                res = self.forward_backward(batch, epoch, i)
                stop = stop or res.stop
                tokens += res.tokens
                stepped = False
                if not res.skipped:
                    for k, v in res.losses.items():
                        acc[k] = acc.get(k, 0.0) + v
                    n_acc += 1
                    stepped = self.optimizer_step(epoch, i)
                self.position.batch = i + 1
                if not stepped:
                    continue
                gs = self.global_step
                record = {"step": gs, "epoch": epoch, "batch": i,
                          "lr": schedule.learning_rate(cfg, epoch, i // cfg.grad_accum),
                          "alpha": schedule.alpha(cfg, epoch, i, self.batches_per_epoch),
                          **{k: v / max(n_acc, 1) for k, v in acc.items()}}
                log.step(record, samples=cfg.batch_size * cfg.grad_accum * self.world, tokens=tokens, wait_s=wait)
                acc, n_acc, tokens, wait = {}, 0, 0.0, 0.0
                if gs % cfg.log_every == 0:
                    extra = {"alpha": record["alpha"], "temp": self.temperature()} if self.task.has_momentum else {}
                    log.flush_window(gs, {"lr": record["lr"], **extra, "epoch": epoch,
                                          "skipped": self.position.skipped})
                if gs >= total or stop:
                    done = True
                    break
                if cfg.save_every_steps and gs % cfg.save_every_steps == 0:
                    self.save()
            if self.position.batch >= self.batches_per_epoch:
                self.position.epoch, self.position.batch = epoch + 1, 0
                if not done:
                    self.save()
        if self.global_step > 0 and self.last_saved != checkpoint.tag_for(self.global_step):
            self.save()
        self._restore_signal_handlers(previous)
        result = {"steps": self.global_step, "skipped": self.position.skipped}
        if stop and self.global_step < total:
            result["stopped"] = stop
            log.print(f"stopping on {stop} after step {self.global_step}: checkpoint {self.last_saved} committed; "
                      f"continue with --resume")
            log.close()
            return result
        if cfg.eval.enabled:
            result["eval"] = self.evaluate()
        log.close()
        return result

    # -- evaluation ----------------------------------------------------------------------------

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model in the blipfast layout, fp32 on the CPU, on every rank (a collective
        under ZeRO-3). Shared tensors appear under each of their names, as in model.state_dict()."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with self._gathered(list(self.model.parameters())):
            sd = {k: p.detach().float().cpu().clone() for k, p in params.items()}
        for k, b in self.model.named_buffers(remove_duplicate=False):
            sd[k] = b.detach().cpu().clone()
        sd.update(self.momentum.state_dict())
        return sd

    def evaluate(self) -> Dict:
        """The task's end-of-run evaluation (pretrain: held-out recall and a few greedy captions;
        retrieval: recall@1/5/10; caption: BLEU-4 / CIDEr), on rank 0 with a plain fp32 copy."""
        cfg = self.run.train.eval
        sd = self.full_state_dict()
        result: Dict = {}
        if self.rank == 0:
            ev = self.eval_set if self.eval_set is not None else self.task.build_eval_set(self.run, self.tokenizer)
            if cfg.max_images and ev is not None:
                ev = self.task.subset_eval(ev, cfg.max_images)
            model = self.task.build_model(self.run.model, self.tokenizer)
            model.load_state_dict(sd, strict=True)
            model.to(self.device).eval()
            t0 = time.perf_counter()
            result = self.task.evaluate(model, ev, self.tokenizer, cfg, self.device)
            result["task"] = self.task.name
            result["eval_seconds"] = time.perf_counter() - t0
            for name, obj in result.pop("files", {}).items():  # e.g. VQA's result file for the server
                with open(os.path.join(self.output_dir, name), "w") as f:
                    json.dump(obj, f)
                result.setdefault("written", []).append(name)
            with open(os.path.join(self.output_dir, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
            _print_eval(result)
        if self.world > 1:
            dist.barrier()
        return result


def _print_eval(result: Dict) -> None:
    if "inference" in result:  # task vqa
        acc = result["accuracy"]
        print(f"held-out VQA ({result['inference']}) on {result['num_questions']} questions: "
              + (f"accuracy {acc['overall']:.2f}%" if acc else "no reference answers")
              + "".join(f", {k[5:]} {v:.2f}%" for k, v in (acc or {}).items() if k.startswith("type:")), flush=True)
        for e in result.get("examples", []):
            print(f"  {e['question']!r} -> {e['answer']!r}  (reference: {e['reference']!r})", flush=True)
        return
    if "scores" in result:  # task caption
        s = result["scores"]
        print(f"held-out captioning on {result['num_images']} images: BLEU-4 {s['BLEU-4']:.4f}  "
              f"CIDEr {s['CIDEr']:.4f}", flush=True)
        for c in result.get("captions", []):
            print(f"  caption: {c['generated']!r}  (reference: {c['reference']!r})", flush=True)
        return
    r = result["recall"]
    print(f"held-out retrieval on {result['num_images']} images / {result['num_texts']} texts "
          f"(chance R@1 = {result['chance_r1_percent']:.2f}%):\n"
          f"  image->text R@1 {r['txt_r1']:.2f}  R@5 {r['txt_r5']:.2f}  R@10 {r['txt_r10']:.2f}\n"
          f"  text->image R@1 {r['img_r1']:.2f}  R@5 {r['img_r5']:.2f}  R@10 {r['img_r10']:.2f}", flush=True)
    for c in result.get("captions", []):
        print(f"  caption: {c['generated']!r}  (reference: {c['reference']!r})", flush=True)
