"""The transformers-``generate`` rollout engine: the fallback behind the same interface as vLLM.

Use it where vLLM is missing (the GPU test machines) or on toy models, where it is as fast.
Behaviour logprobs come from ``generate``'s ``scores``, which are the logits after the sampling
warpers (temperature, top_p): the same meaning as ``VLLMEngine``'s default
``logprobs_mode="processed_logprobs"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from posttrain.sync.collective import receive_version
from posttrain.sync.group import GroupInfo, UpdateGroup
from posttrain.sync.group import join as join_group
from posttrain.types import Completion, Group, PromptRecord
from posttrain.weight_sync import WeightBucket, WeightSyncError

from .adapter_merge import AdapterMerger, CheckpointBase
from .engine import DTYPES, LoadReport, check_engine_config
from .sampling import SamplingConfig
from .weight_receiver import ParamManifest, WeightUpdateSession

log = logging.getLogger(__name__)


@dataclass
class HFEngineConfig:
    """How to start the transformers engine.

    Attributes:
        model_path: local Hugging Face directory (config.json + weights + tokenizer).
        dtype: float32 | bfloat16 | float16.
        device: "cpu", "cuda", "cuda:1", ...; "auto" picks cuda when available.
        max_model_len: prompt + completion tokens at most (longer requests are refused).
    """

    model_path: str
    dtype: str = "float32"
    device: str = "auto"
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        check_engine_config(self.dtype, self.model_path)


class HFEngine:
    """A :class:`~posttrain.rollout.engine.RolloutEngine` backed by ``model.generate``."""

    def __init__(self, config: HFEngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=DTYPES[config.dtype])
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.manifest = ParamManifest.from_module(self.model)
        self._tensors = self.model.state_dict(keep_vars=True)
        self._adapters: AdapterMerger | None = None
        self._version = 0
        self._digest = 0  # of the buckets that made the served version (0: the initial weights)
        self._group: UpdateGroup | None = None
        self._unservable: str | None = None
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def version(self) -> int:
        return self._version

    def _check_servable(self) -> None:
        if self._unservable is not None:
            raise WeightSyncError(f"engine refuses to serve partial weights: {self._unservable}")

    @torch.no_grad()
    def generate(self, prompts: list[PromptRecord], sampling: SamplingConfig) -> list[Group]:
        """Sample ``sampling.n`` completions per prompt in one left-padded batch."""
        self._check_servable()
        if not prompts:
            return []
        longest = max(len(p.token_ids) for p in prompts)
        if longest + sampling.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt of {longest} tokens + max_tokens {sampling.max_tokens} exceeds max_model_len "
                f"{self.config.max_model_len}: raise rollout.engine.max_model_len or lower max_tokens"
            )
        rows = [p.token_ids for p in prompts for _ in range(sampling.n)]
        input_ids = torch.full((len(rows), longest), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, longest - len(ids) :] = torch.tensor(ids)
            attention_mask[i, longest - len(ids) :] = 1
        greedy = sampling.temperature == 0
        kwargs = (
            {"do_sample": False}
            if greedy
            # top_k=0: HF's default top_k=50 would sample from another distribution than vLLM's
            else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + prompts[0].ordinal)
            elif sampling.batch_seed is not None:
                torch.manual_seed(sampling.batch_seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=sampling.max_tokens,
                stop_strings=list(sampling.stop) or None,
                tokenizer=self.tokenizer,
                pad_token_id=self._pad_id,
                eos_token_id=self.tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_scores=True,
                **kwargs,
            )
        new_tokens_BT = out.sequences[:, longest:].cpu()
        scores_BTV = torch.stack(out.scores, dim=1).float().cpu()
        logprobs_BT = (
            torch.log_softmax(scores_BTV, dim=-1).gather(-1, new_tokens_BT.unsqueeze(-1)).squeeze(-1)
        )
        groups = []
        for p_idx, prompt in enumerate(prompts):
            completions = []
            for s in range(sampling.n):
                row = p_idx * sampling.n + s
                completions.append(
                    self._completion(prompt, s, new_tokens_BT[row], logprobs_BT[row], sampling)
                )
            groups.append(Group(prompt=prompt, completions=completions))
        return groups

    def _completion(
        self,
        prompt: PromptRecord,
        index: int,
        tokens_T: torch.Tensor,
        logprobs_T: torch.Tensor,
        sampling: SamplingConfig,
    ) -> Completion:
        tokens = tokens_T.tolist()
        if prompt.max_tokens is not None:  # the request's own cap: the batch ran to the longest one
            tokens = tokens[: prompt.max_tokens]
        eos = self.tokenizer.eos_token_id
        length, finish = len(tokens), "length"
        if eos in tokens:  # keep the EOS token (as vLLM does), drop the padding after it
            length, finish = tokens.index(eos) + 1, "stop"
        tokens = tokens[:length]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in sampling.stop:
            # The batch runs until every row stops; cut this row after its first stop string.
            cut = self._stop_cut(tokens, stop)
            if cut is not None:
                tokens, finish = tokens[:cut], "stop"
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                text = text[: text.find(stop)] if stop in text else text
        return Completion(
            prompt=prompt,
            sample_index=index,
            token_ids=tokens,
            text=text,
            logprobs=logprobs_T[: len(tokens)].tolist(),
            versions=[self._version] * len(tokens),
            finish_reason=finish,
        )

    def _stop_cut(self, tokens: list[int], stop: str) -> int | None:
        """Smallest prefix length whose decoded text contains ``stop``, or None."""
        for k in range(1, len(tokens) + 1):
            if stop in self.tokenizer.decode(tokens[:k], skip_special_tokens=True):
                return k
        return None

    @torch.no_grad()
    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix; L-1 values per sequence."""
        self._check_servable()
        scores = []
        for ids in token_ids_list:
            ids_T = torch.tensor([ids], device=self.device)
            logprobs_TV = torch.log_softmax(self.model(ids_T).logits[0].float(), dim=-1)
            scores.append(logprobs_TV[:-1].gather(-1, ids_T[0, 1:].unsqueeze(-1)).squeeze(-1).tolist())
        return scores

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[WeightBucket], version: int, restore: bool = False) -> LoadReport:
        """Copy a full new version into the model; see ``RolloutEngine.load_weights``."""
        start = time.perf_counter()
        session = WeightUpdateSession(self.manifest, self._version, version, restore)
        self._unservable = f"the update to version {version} did not complete"
        count = 0
        for bucket in buckets:
            self._load_bucket(session, bucket)
            count += 1
        return self._finish(session, version, count, start)

    def _load_bucket(self, session: WeightUpdateSession, bucket: WeightBucket) -> None:
        checked = session.accept(bucket)
        if self._adapters is None:  # LoRA versions merge into the kept base weights (rollout/adapter_merge.py)
            self._adapters = AdapterMerger(CheckpointBase(self.config.model_path, DTYPES[self.config.dtype]), {})
        for name, tensor in self._adapters.tensors(checked.tensors(), checked.is_last):
            self._tensors[name].data.copy_(tensor)

    def _finish(self, session: WeightUpdateSession, version: int, count: int, start: float) -> LoadReport:
        session.finish()
        self._version, self._digest = version, session.digest
        self._unservable = None
        return LoadReport(version, count, session.bytes, time.perf_counter() - start, session.digest)

    def join_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        """Join the model-update group at ``rank_offset`` (one rank: no tensor parallelism)."""
        if self._group is not None:
            self._group.close()
        self._group = join_group(info, rank_offset)

    @torch.no_grad()
    def receive_weights(self, version: int, restore: bool = False) -> LoadReport:
        """``load_weights`` with the buckets broadcast over the update group."""
        if self._group is None:
            raise WeightSyncError("receive_weights before join_update_group: the engine is in no update group")
        start = time.perf_counter()
        session = WeightUpdateSession(self.manifest, self._version, version, restore)
        self._unservable = f"the update to version {version} did not complete"
        count = receive_version(self._group, lambda bucket: self._load_bucket(session, bucket))
        return self._finish(session, version, count, start)

    def weight_digest(self) -> tuple[int, int]:
        return self._version, self._digest

    def sleep(self, level: int = 1) -> None:
        """Colocated mode: move weights to host memory on GPU; a logged no-op on CPU."""
        if self.device.type == "cpu":
            log.info("HF engine sleep skipped (CPU)")
            return
        self.model.to("cpu")
        torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """``tags`` (vLLM's sleep tags) mean nothing here: the weights are all this engine moves."""
        if self.device.type == "cpu":
            log.info("HF engine wake_up skipped (CPU)")
            return
        self.model.to(self.device)

    def close(self) -> None:
        self.model = None
        self._tensors = {}
