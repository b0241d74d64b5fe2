"""The offline driver (SFT, DPO, reward models): data -> FSDP2 engine -> checkpoints -> export.

Runs on every trainer rank (spawned by ``posttrain.engine.dist.launch``); rank 0 logs, evaluates
and exports. One loop, reading as the data flow: sample a global batch, take this rank's share,
split into micro-batches, one optimizer step.
"""

from __future__ import annotations

import copy
import json
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from posttrain.config.errors import PosttrainError
from posttrain.config.schema import RecipeConfig
from posttrain.data.sampler import ResumableSampler
from posttrain.data.sources import DatasetSource, load_rows
from posttrain.data.tasks import first_line
from posttrain.data.templates import apply_templates
from posttrain.engine.checkpoint import export_hf, find_checkpoint, load_checkpoint, save_checkpoint
from posttrain.engine.dist import device_for_rank, launch
from posttrain.engine.packing import packed_micro_batches, row_lengths
from posttrain.engine.trainer import TrainEngine
from posttrain.metrics import MetricsLogger
from posttrain.models.loading import load_tokenizer
from posttrain.models.lora import BaseReference


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_checker(src: DatasetSource | None):
    """How eval completions are scored: the synthetic task's checker, else exact match on 'answer'."""
    if src is None:
        return None
    if src.synthetic is not None and hasattr(src.synthetic, "is_correct"):
        return src.synthetic.is_correct
    return lambda row, completion: "answer" in row and first_line(completion) == str(row["answer"])


class Evaluator:
    """Gathers the sharded weights into an unsharded copy on rank 0 and runs the algorithm's eval."""

    def __init__(self, algo, model: torch.nn.Module, examples, rows, tokenizer, checker, rank: int, max_new_tokens: int) -> None:
        self.algo, self.examples, self.rows, self.tok, self.checker, self.rank = algo, examples, rows, tokenizer, checker, rank
        self.max_new_tokens = max_new_tokens
        self.model = copy.deepcopy(model) if rank == 0 and examples else None

    def __call__(self, engine: TrainEngine) -> dict[str, float]:
        if not self.examples:
            return {}
        full = engine.full_state_dict()
        out: dict[str, float] = {}
        if self.rank == 0:
            self.model.load_state_dict(full)
            out = {f"eval/{k}": v for k, v in self.algo.evaluate(self.model, self.examples, self.rows, self.tok, self.checker, self.max_new_tokens).items()}
        if dist.is_initialized():
            dist.barrier()
        return out


# A skipped non-finite step changes no weights; this many in a row means the run has diverged and
# would otherwise loop forever on fresh batches without advancing.
MAX_NONFINITE_IN_A_ROW = 10


class DivergedError(PosttrainError):
    def __init__(self, step: int, n: int) -> None:
        super().__init__(
            f"training diverged after step {step}: {n} steps in a row had a non-finite loss or gradient norm and were "
            "skipped (no checkpoint was written for them).\n  fix: lower trainer.optim.lr or set trainer.grad_clip, "
            "check the data for empty or broken rows, and resume from the last checkpoint (checkpoint.resume=auto)"
        )


class PackingUnsupportedError(PosttrainError):
    def __init__(self, algo: str) -> None:
        super().__init__(
            f"trainer.max_tokens_per_micro_batch: {algo} does not support sequence packing (its score head "
            "reads each padded row's last token).\n  fix: remove trainer.max_tokens_per_micro_batch (padded "
            "micro-batches of trainer.micro_batch_size); SFT, DPO and the RL trainers pack"
        )


def should_save(step: int, metrics: dict[str, float], every: int, max_steps: int) -> bool:
    """Checkpoint after this step? Never after a skipped non-finite step: the engine did not advance,
    so ``step`` names the previous, already saved state and the sampler has moved past its batch."""
    if metrics.get("skipped_nonfinite"):
        return False
    return bool(every and step % every == 0) or step == max_steps


def rank_main(rank: int, world: int, cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str) -> None:
    try:
        _train(rank, world, cfg, resolved, run_dir)
    except KeyboardInterrupt:
        if world > 1:  # a spawned rank: exit quietly, the launching process prints the one line
            os._exit(130)
        raise


def _train(rank: int, world: int, cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str) -> None:
    seed_everything(cfg.run.seed + rank)
    algo = cfg.algorithm.build()
    tok = apply_templates(load_tokenizer(cfg.model), cfg.data)
    d = cfg.data
    train_ex, _ = algo.prepare(load_rows(d.train, "data.train", d.fields), tok, d.max_length, d.max_bad_fraction, "data.train")
    eval_ex, eval_rows = algo.prepare(load_rows(d.eval, "data.eval", d.fields), tok, d.max_length, d.max_bad_fraction, "data.eval") if d.eval else ([], [])

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = algo.load_model(cfg.model)
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model_config, model_class = model.config, type(model)
    evaluate = Evaluator(algo, model, eval_ex, eval_rows, tok, make_checker(d.eval), rank, cfg.eval.max_new_tokens)
    device = device_for_rank(rank)
    engine = TrainEngine(model, cfg.trainer, device)
    if algo.needs_reference:  # with LoRA the reference is the policy with its adapters off: no second copy
        algo.reference = BaseReference(engine) if cfg.model.lora else TrainEngine(algo.load_model(cfg.model), cfg.trainer, device, trainable=False)

    sampler = ResumableSampler(len(train_ex), cfg.run.seed, d.shuffle)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if cfg.checkpoint.resume:
        path = find_checkpoint(cfg.checkpoint.resume, ckpt_root)
        if path:
            extra = load_checkpoint(path, engine)
            sampler.load_state_dict(extra["sampler"])
    log = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, resolved, enabled=rank == 0)
    summary: dict[str, Any] = {"start_step": engine.step}
    if engine.step == 0:
        summary["before"] = evaluate(engine)
        log.log(0, summary["before"])

    t = cfg.trainer
    skipped_in_a_row = 0
    while engine.step < t.max_steps:
        mine = sampler.take(t.global_batch_size)[rank::world]
        if t.max_tokens_per_micro_batch is None:
            micro = [algo.collate([train_ex[i] for i in mine[j : j + t.micro_batch_size]], tok.pad_token_id) for j in range(0, len(mine), t.micro_batch_size)]
        else:  # packed micro-batches of at most max_tokens_per_micro_batch tokens (posttrain.engine.packing)
            rows = algo.collate([train_ex[i] for i in mine], tok.pad_token_id)
            lengths = row_lengths(rows["attention_mask_BT"]).tolist()
            plans = engine.plan_micro_batches(lengths, rows["input_ids_BT"], pairs=getattr(algo, "pairs", False))
            micro = packed_micro_batches(rows, plans)
        metrics = engine.train_step(micro, algo.loss, algo.count)
        metrics["epoch"] = sampler.epoch
        step = engine.step
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < t.max_steps:
            metrics.update(evaluate(engine))
        log.log(step, metrics)
        skipped_in_a_row = skipped_in_a_row + 1 if metrics.get("skipped_nonfinite") else 0
        if skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise DivergedError(step, skipped_in_a_row)
        if should_save(step, metrics, cfg.checkpoint.every_steps, t.max_steps):
            save_checkpoint(ckpt_root, step, engine, {"sampler": sampler.state_dict()}, cfg.checkpoint.keep_last)

    summary["after"] = evaluate(engine)
    log.log(engine.step, summary["after"])
    log.close()
    if cfg.checkpoint.export_hf:
        export_hf(os.path.join(run_dir, "hf"), engine, model_config, tok, model_class, base_model=cfg.model.path)
    if rank == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)


def preflight(cfg: RecipeConfig) -> None:
    """Fail before any rank starts: model path, tokenizer, data files and bad-row limits."""
    algo, tok, d = cfg.algorithm.build(), apply_templates(load_tokenizer(cfg.model), cfg.data), cfg.data
    if cfg.trainer.max_tokens_per_micro_batch is not None and not getattr(algo, "packs", False):
        raise PackingUnsupportedError(type(algo).__name__)
    for key, src in (("data.train", d.train), ("data.eval", d.eval)):
        if src is not None:
            algo.prepare(load_rows(src, key, d.fields), tok, d.max_length, d.max_bad_fraction, key)


def run_offline(cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str) -> dict[str, Any]:
    preflight(cfg)
    launch(rank_main, cfg.trainer.world_size, args=(cfg, resolved, run_dir), backend=cfg.trainer.backend)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)
