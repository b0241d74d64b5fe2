"""``posttrain export RUN_DIR [--step N] [--merge]``: a run's model as a Hugging Face directory.

- no ``--step``: the run's end-of-run export is ``RUN_DIR/hf`` already (a LoRA run's is its
  adapter; ``--merge`` folds it into the base, see posttrain.models.lora_export);
- ``--step N``: the policy weights of checkpoint ``RUN_DIR/checkpoints/step_N`` (verified against
  its manifest), written to ``RUN_DIR/hf_step_N``: the model is rebuilt from the run's
  ``config.yaml`` and the weights read from the DCP shards in one process (no process group;
  DCP reshards the saved FSDP shards into whole tensors). Offline runs save the model as
  ``model.*``, RL runs as ``policy.model.*``; both are found.

Every input is checked first; a missing or non-run directory and a missing step exit 4 with the fix.
"""

from __future__ import annotations

import os
import warnings

from posttrain.config.errors import PosttrainError


class ExportInputError(PosttrainError):
    """The directory or step given to ``posttrain export`` is not what it needs."""

    exit_code = 4


def check_run_dir(run_dir: str) -> str:
    """``run_dir`` exists and holds a run's ``config.yaml``; returns the config path."""
    if not os.path.isdir(run_dir):
        raise ExportInputError(f"'{run_dir}' does not exist.\n  fix: give a run directory written by `posttrain run`, e.g. runs/sft_tiny_arith")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ExportInputError(f"'{run_dir}' is not a run directory (it has no config.yaml).\n"
                               "  fix: give a run directory written by `posttrain run`, e.g. runs/sft_tiny_arith")
    return config_path


def is_lora_run(run_dir: str) -> bool:
    import yaml

    with open(check_run_dir(run_dir)) as f:
        return bool(((yaml.safe_load(f) or {}).get("model") or {}).get("lora"))


def available_steps(run_dir: str) -> list[int]:
    from posttrain.engine.checkpoint import _step_dirs

    return [int(d[len("step_"):]) for d in _step_dirs(os.path.join(run_dir, "checkpoints")) if d[len("step_"):].isdigit()]


def export_checkpoint(run_dir: str, step: int, out_dir: str | None = None, merge: bool = False) -> str:
    """Write checkpoint ``step`` of the run in ``run_dir`` as a HF directory; returns its path.

    A LoRA run writes its adapter (PEFT format), or with ``merge`` the merged model."""
    import torch.distributed.checkpoint as dcp

    from posttrain.config.loader import load_recipe
    from posttrain.engine.checkpoint import verify_manifest
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.models.lora import has_lora, lora_config_of, merge_lora, save_adapter

    config_path = check_run_dir(run_dir)
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if not os.path.isdir(path):
        steps = available_steps(run_dir)
        raise ExportInputError(f"{run_dir} has no checkpoint of step {step}.\n"
                               f"  fix: use one of the saved steps {steps or '(none: the run saved no checkpoint yet)'}")
    problem = verify_manifest(path)
    if problem is not None:
        raise ExportInputError(f"checkpoint {path} is incomplete or corrupt: {problem}.\n  fix: export another step: {available_steps(run_dir)}")
    cfg, _ = load_recipe(config_path, [])
    build = getattr(cfg.algorithm, "build", None)
    algo = build() if callable(build) else None
    model = algo.load_model(cfg.model) if algo is not None and hasattr(algo, "load_model") else load_causal_lm(cfg.model, meta=False)
    keys = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    prefix = next((p for p in ("policy.model.", "model.") if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise ExportInputError(f"checkpoint {path} holds no model weights (keys like model.* or policy.model.*).\n"
                               "  fix: export a checkpoint written by `posttrain run`")
    state = {k: v for k, v in model.state_dict().items() if prefix + k in keys}
    missing = [k for k in model.state_dict() if k not in state and "lm_head" not in k]
    if missing:
        raise ExportInputError(f"checkpoint {path} does not match the run's model (missing {missing[:3]}).\n"
                               "  fix: the run's config.yaml must be the one that wrote the checkpoint")
    nested: dict = {}
    node = nested
    parts = prefix.rstrip(".").split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = state
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(nested, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    out_dir = out_dir or os.path.join(run_dir, f"hf_step_{step}" + ("_merged" if merge else ""))
    tok = load_tokenizer(cfg.model)
    if has_lora(model) and not merge:
        save_adapter(out_dir, model.state_dict(), lora_config_of(model), cfg.model.path)
    else:
        if has_lora(model):
            merge_lora(model)
        model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
