"""The recipe schema: one typed section per component; the algorithm is chosen by ``_target_``.

Each component reads only its own section (``cfg.trainer`` goes to the engine, ``cfg.model`` to
the model loader, ...); nothing reads the root config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.sources import DatasetSource
from posttrain.engine.checkpoint import CheckpointConfig
from posttrain.engine.trainer import TrainerConfig
from posttrain.metrics import LoggingConfig
from posttrain.models.loading import ModelConfig


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 0


@dataclass
class DataConfig:
    train: DatasetSource = field(default_factory=DatasetSource)
    eval: DatasetSource | None = None
    max_length: int = 256  # tokens (prompt + response); longer rows are skipped and counted
    max_bad_fraction: float = 0.05  # more bad rows than this stops the run
    shuffle: bool = True
    # The text format of rows (posttrain/data/templates.py); needed when the tokenizer has no chat template.
    prompt_template: str | None = None  # plain text with one {prompt}, e.g. "Question: {prompt}\nAnswer: "
    chat_template: str | None = None  # a Jinja chat template, or the path of a .jinja file
    # Dataset columns under posttrain's names: {response: completion} reads TRL's `completion` column
    # as the response (posttrain name -> the data's column, for train and eval).
    fields: dict[str, str] = field(default_factory=dict)

    def validate(self) -> tuple[str, str, str] | None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            return ("max_bad_fraction", f"{self.max_bad_fraction} is not a fraction", "use a value in [0, 1]")
        if self.prompt_template is not None and self.chat_template is not None:
            return ("prompt_template", "both data.prompt_template and data.chat_template are set", "keep one of them")
        if self.prompt_template is not None and self.prompt_template.count("{prompt}") != 1:
            return ("prompt_template", f"{self.prompt_template!r} must hold '{{prompt}}' exactly once",
                    "write it like 'Question: {prompt}\\nAnswer: '")  # fmt: skip
        return None


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only before and after training
    max_new_tokens: int = 16
    # Online RL: one reward node ({name, fn, kwargs}, the reward section's form) that scores eval
    # alone; None: a synthetic task's checker, else the recipe's reward graph (posttrain/rl/evaluation.py).
    scorer: dict[str, Any] | None = None
    pass_reward: float = 1.0  # a reward-scored eval completion is correct at this reward or above


@dataclass
class RecipeConfig:
    algorithm: Any  # {_target_: posttrain.offline.sft.SFTConfig, ...} — a dataclass with build()
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Online RL only (the algorithm declares and validates them; offline recipes must omit them).
    rollout: Any = None
    reward: Any = None
    cluster: Any = None
    sync: Any = None  # weight sync trainer -> rollout workers (posttrain.rl.config.SyncConfig)
