"""Mutation check for the RL maths and its wiring: each mutant is a plausible wrong formula or call site
(which model, which logprobs, which values feed a loss); the fast suite must go red.

    python tests/mutants/run_mutants.py            # table on stdout; exit 1 if a mutant survives
    python tests/mutants/run_mutants.py --json out.json --only dual_clip_positive_adv

How: the repository's importable tree is copied once to a temporary directory laid out as the
installed package (``posttrain/`` with ``rewards/``, ``rollout/``, ``sandboxes/`` inside it, as
pyproject's package-dir maps them) plus ``tests/`` and ``pyproject.toml``. The unmutated copy must
pass first. Then, per mutant: patch one exact text (it must occur exactly once, so a refactor that
moves the code makes the mutant STALE rather than silently harmless), run the mutant's test files
there with ``PYTHONPATH`` = the copy, restore the file. Before anything runs, a probe checks that
``posttrain``, ``posttrain.rewards`` and the mutated modules import from the copy, not from the
editable install (whose finder comes after ``PYTHONPATH`` on ``sys.meta_path``).

A mutant is KILLED when pytest reports failing tests (exit 1); SURVIVED when the tests pass;
ERROR for anything else (collection error, timeout) and STALE when the patch text is not found
once: all but KILLED fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# repository folder -> its place in the copy (pyproject: package-dir)
LAYOUT = {
    "posttrain": "posttrain",
    "rewards": "posttrain/rewards",
    "rollout": "posttrain/rollout",
    "sandboxes": "posttrain/sandboxes",
    "tests": "tests",
}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "runs", "*.egg-info")

LOSS_TESTS = ("tests/unit/test_policy_loss.py", "tests/unit/test_kl.py")
ADV_TESTS = ("tests/unit/test_advantages.py",)
LOGPROB_TESTS = ("tests/unit/test_processed_logprobs.py",)
WIRING_TESTS = ("tests/unit/test_rl_wiring.py",)  # a real TrainerWorker (one gloo rank, no Ray)
STEP_TESTS = ("tests/unit/test_rl_step_maths.py",)  # the Step with a real reward graph, fake trainers
CRITIC_TESTS = ("tests/unit/test_rl_critic.py",)
WORKER = "posttrain/rl/trainer_worker.py"
STEP = "posttrain/rl/step.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the copy (package layout)
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS = [
    Mutant(
        "dual_clip_positive_adv", "posttrain/algorithms/policy_loss.py",
        "dual_clipped = (adv < 0) & (pg > dual_bound)", "dual_clipped = pg > dual_bound",
        LOSS_TESTS, "dual clip also applied when A > 0",
    ),
    Mutant(
        "tis_two_sided", "posttrain/algorithms/policy_loss.py",
        "weight = raw.clamp(max=cfg.tis_cap)", "weight = raw.clamp(min=1.0 / cfg.tis_cap, max=cfg.tis_cap)",
        LOSS_TESTS, "truncated IS clamped on both sides",
    ),
    Mutant(
        "temperature_ignored", "posttrain/algorithms/logprobs.py",
        "scaled = logits_NV.float() / temperature", "scaled = logits_NV.float()",
        LOGPROB_TESTS, "T ignored in the trainer's logprobs",
    ),
    Mutant(
        "grpo_std_no_bessel", "posttrain/algorithms/advantages.py",
        "var_N1 = zero_masked(adv**2, v).sum(-1, keepdim=True) / (count_N1 - 1).clamp(min=1)",
        "var_N1 = zero_masked(adv**2, v).sum(-1, keepdim=True) / count_N1.clamp(min=1)",
        ADV_TESTS, "GRPO std without Bessel's correction",
    ),
    Mutant(
        "token_mean_as_seq_mean", "posttrain/algorithms/policy_loss.py",
        "return masked_sum(loss_BT, mask_BT) / num_tokens",
        "return (masked_sum(loss_BT, mask_BT, dim=-1) / mask_BT.sum(-1).clamp(min=1)).sum() / num_seqs",
        LOSS_TESTS, "token-mean aggregation replaced by sequence-mean",
    ),
    Mutant(
        "kl_sign_flipped", "posttrain/algorithms/kl.py",
        "return KL_ESTIMATORS[estimator](logprobs_BT - ref_logprobs_BT)",
        "return KL_ESTIMATORS[estimator](ref_logprobs_BT - logprobs_BT)",
        LOSS_TESTS, "KL log-ratio sign flipped (log ref/pi)",
    ),
    Mutant(
        "gae_lambda_ignored", "posttrain/algorithms/advantages.py",
        "delta_B + gamma * lam * next_adv_B", "delta_B + gamma * next_adv_B",
        ADV_TESTS, "GAE lambda ignored",
    ),
    # -- beyond the list: one plausible slip per remaining formula
    Mutant(
        "kl_reward_penalty_sign", "posttrain/algorithms/kl.py",
        "return -coef * kl_BT, kl_BT", "return coef * kl_BT, kl_BT",
        LOSS_TESTS, "KL in the reward added instead of subtracted",
    ),
    Mutant(
        "k3_unclamped", "posttrain/algorithms/kl.py",
        "return (torch.expm1(-x) + x).clamp(max=MAX_KL_TOKEN)", "return torch.expm1(-x) + x",
        LOSS_TESTS, "k3 without verl's clamp",
    ),
    Mutant(
        "group_score_ignores_token_rewards", "posttrain/algorithms/advantages.py",
        "return inputs.rewards_NG + token_sum_B.view_as(inputs.rewards_NG)", "return inputs.rewards_NG",
        ADV_TESTS, "group estimators ignore token-level rewards (KL, process rewards)",
    ),
    Mutant(
        "rloo_includes_self", "posttrain/algorithms/advantages.py",
        "others_mean = (r.sum(-1, keepdim=True) - r) / (count_N1 - 1).clamp(min=1)",
        "others_mean = r.sum(-1, keepdim=True) / count_N1.clamp(min=1)",
        ADV_TESTS, "RLOO baseline includes the sample itself",
    ),
    Mutant(
        "reinforce_pp_gamma_ignored", "posttrain/algorithms/advantages.py",
        "next_B = torch.where(valid[:, t], r[:, t] + gamma * next_B, next_B)",
        "next_B = torch.where(valid[:, t], r[:, t] + next_B, next_B)",
        ADV_TESTS, "REINFORCE++ reward-to-go ignores gamma",
    ),
    Mutant(
        "clip_high_ignored", "posttrain/algorithms/policy_loss.py",
        "clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)",
        "clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_low)",
        LOSS_TESTS, "DAPO clip-higher ignored (symmetric clip)",
    ),
    Mutant(
        "value_clip_min", "posttrain/algorithms/policy_loss.py",
        "per_token = torch.maximum(unclipped, clipped)", "per_token = torch.minimum(unclipped, clipped)",
        LOSS_TESTS, "clipped value loss takes the min (optimistic)",
    ),
    Mutant(
        "adaptive_kl_inverted", "posttrain/algorithms/kl.py",
        "error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)",
        "error = min(max(1.0 - current_kl / self.target_kl, -0.2), 0.2)",
        LOSS_TESTS, "adaptive KL controller moves the wrong way",
    ),
    Mutant(
        "top_p_keeps_boundary_mass", "posttrain/algorithms/logprobs.py",
        "drop_sorted_NV[:, -1] = False  # at least one token",
        "drop_sorted_NV[:, -2:] = False  # at least one token",
        LOGPROB_TESTS, "top-p always keeps two tokens",
    ),
    Mutant(
        "k2_clamped", "posttrain/algorithms/kl.py",
        "return 0.5 * log_ratio**2", "return (0.5 * log_ratio**2).clamp(max=MAX_KL_TOKEN)",
        LOSS_TESTS, "k2 clamped at 10 nats (verl's is not)",
    ),
    # -- the trainer rank's call sites (issue #26): which model, which logprobs, which values
    Mutant(
        "ref_logprobs_from_policy", WORKER,
        "lp = self.reference.forward(", "lp = self.policy.forward(",
        WIRING_TESTS, "reference logprobs computed by the policy",
    ),
    Mutant(
        "ref_scored_with_top_p", WORKER,
        'self.reference_top_p = spec.top_p if algo.reference_logprobs == "sampler" else 1.0',
        "self.reference_top_p = spec.top_p",
        WIRING_TESTS, "reference filtered by the sampler's top-p (not a distribution) by default",
    ),
    Mutant(
        "ref_sampler_option_ignored", WORKER,
        'self.reference_top_p = spec.top_p if algo.reference_logprobs == "sampler" else 1.0',
        "self.reference_top_p = 1.0",
        WIRING_TESTS, "reference_logprobs=sampler has no effect",
    ),
    Mutant(
        "tis_from_current_policy", WORKER,
        'old = mb["old_logprobs_BT"] if "old_logprobs_BT" in mb else lp.detach()', "old = lp.detach()",
        WIRING_TESTS, "recomputed old logprobs ignored: ratio 1, TIS weight from pi_theta",
    ),
    Mutant(
        "tis_old_and_behaviour_swapped", WORKER,
        'lp, old, mb["behaviour_logprobs_BT"], mb["advantages_BT"]', 'lp, mb["behaviour_logprobs_BT"], old, mb["advantages_BT"]',
        WIRING_TESTS, "behaviour logprobs used as pi_old and pi_old as behaviour",
    ),
    Mutant(
        "kl_in_loss_against_old", WORKER,
        'ref_logprobs_BT=mb.get("ref_logprobs_BT")', 'ref_logprobs_BT=mb.get("old_logprobs_BT")',
        WIRING_TESTS, "KL in the loss measured against pi_old instead of the reference",
    ),
    Mutant(
        "value_clip_centred_on_new_values", WORKER,
        'value_loss(values, mb["values_BT"], mb["returns_BT"]', 'value_loss(values, values.detach(), mb["returns_BT"]',
        WIRING_TESTS, "value clip centred on the current values (never binds)",
    ),
    Mutant(
        "value_clip_values_and_returns_swapped", WORKER,
        'value_loss(values, mb["values_BT"], mb["returns_BT"]', 'value_loss(values, mb["returns_BT"], mb["values_BT"]',
        WIRING_TESTS, "old values and returns swapped in the value loss",
    ),
    Mutant(
        "epoch_shuffle_reused", STEP,
        "torch.randperm(inputs.batch.size, generator=gen)",
        "torch.randperm(inputs.batch.size, generator=torch.Generator().manual_seed(seed))",
        STEP_TESTS, "every later PPO epoch reuses one shuffle",
    ),
    Mutant(
        "epochs_unshuffled", STEP,
        "order = None if epoch == 0 else torch.randperm(inputs.batch.size, generator=gen)", "order = None",
        STEP_TESTS, "PPO epochs all in the generated order",
    ),
    Mutant(
        "minibatch_normalised_by_whole_batch", STEP,
        "mb.num_tokens = max(1.0, float(mb.loss_mask_BT.sum()))", "mb.num_tokens = max(1.0, float(b.loss_mask_BT.sum()))",
        STEP_TESTS, "a mini-batch's loss normalised by the whole step's token count",
    ),
    Mutant(
        "overlong_sign_flipped", "posttrain/rewards/overlong.py",
        "return -penalty * min(max(excess, 0.0), 1.0)", "return penalty * min(max(excess, 0.0), 1.0)",
        STEP_TESTS, "overlong penalty rewards long completions",
    ),
    Mutant(
        "kl_in_reward_old_ref_swapped", STEP,
        "kl_reward_penalty(fwd.old_logprobs_BT, fwd.ref_logprobs_BT,", "kl_reward_penalty(fwd.ref_logprobs_BT, fwd.old_logprobs_BT,",
        STEP_TESTS, "KL in the reward of log(ref / pi) (k1 sign flipped)",
    ),
    # -- DAPO's filter (issue #26): it judges the advantages the step trains on
    Mutant(
        "dapo_filter_without_overlong_filter", STEP,
        "batch = build_rl_batch(scored, pad_id, algo.overlong_filter)", "batch = build_rl_batch(scored, pad_id, False)",
        STEP_TESTS, "the filter ignores overlong filtering (keeps groups that train on zeros)",
    ),
    Mutant(
        "dapo_filter_outcomes_only", STEP,
        "adv, _ = step_advantages(batch, scored, algo, fwd, kl_coef)",
        "adv = algo.advantage.compute(advantage_inputs(batch, None, fwd.values_BT))",
        STEP_TESTS, "the filter ignores token/process rewards",
    ),
    Mutant(
        "dapo_filter_needs_every_sample", STEP,
        "return [not bool(part.any()) for part in nonzero_B.split(sizes)]",
        "return [not bool(part.all()) for part in nonzero_B.split(sizes)]",
        STEP_TESTS, "a group is dropped when any sample (e.g. a masked one) has zero advantage",
    ),
    Mutant(
        "reward_metrics_of_the_first_round", STEP,
        "        m_reward.update(trained_reward_metrics(scored, m_reward, batch.sample_mask_NG))\n", "",
        STEP_TESTS, "reward/<node>/mean describes the first scoring round, not the trained batch",
    ),
    Mutant(
        "reward_metrics_include_overlong_masked", STEP,
        "if v is not None and u]", "if v is not None]",
        STEP_TESTS, "reward/<node>/mean counts samples the overlong filter masked out of training",
    ),
    Mutant(
        "scorer_counters_of_one_round", STEP,
        "out[k] = out.get(k, 0.0) + v", "out.setdefault(k, v)",
        STEP_TESTS, "reward counters of the refill rounds dropped",
    ),
    # -- the critic's dropout (issue #26)
    Mutant(
        "critic_dropout_modules_kept", WORKER,
        "if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0.0:", "if False:",
        CRITIC_TESTS, "nn.Dropout modules of the critic left on",
    ),
    Mutant(
        "critic_dropout_keys_named_dropout_only", WORKER,
        '_DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_rate", re.IGNORECASE)',
        '_DROPOUT_NAME = re.compile(r"dropout", re.IGNORECASE)',
        CRITIC_TESTS, "only keys containing 'dropout' zeroed (GPT-2/Phi *_pdrop kept)",
    ),
]


@dataclass
class Outcome:
    name: str
    what: str
    result: str
    seconds: float
    detail: str


def repo_file(copy_path: str) -> Path:
    """The repository file a copy path comes from (longest LAYOUT prefix wins)."""
    for src, rel in sorted(LAYOUT.items(), key=lambda kv: -len(kv[1])):
        if copy_path.startswith(rel + "/"):
            return REPO / src / copy_path[len(rel) + 1 :]
    raise ValueError(f"{copy_path} is outside the copied layout")


def make_copy(dest: Path) -> None:
    for src, rel in LAYOUT.items():
        shutil.copytree(REPO / src, dest / rel, ignore=IGNORE, dirs_exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def check_imports_resolve_to_copy(copy: Path) -> dict[str, str]:
    """Import the mutated modules in a fresh interpreter configured like the test runs."""
    modules = ["posttrain", "posttrain.rewards", "posttrain.algorithms.policy_loss",
               "posttrain.algorithms.advantages", "posttrain.algorithms.kl", "posttrain.algorithms.logprobs",
               "posttrain.rl.step", "posttrain.rl.trainer_worker", "posttrain.rewards.overlong"]
    code = f"import importlib, json; print(json.dumps({{m: importlib.import_module(m).__file__ for m in {modules!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True,
                         timeout=300, check=True)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    strays = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(copy.resolve())}
    if strays:
        raise SystemExit(f"imports do not resolve to the copy {copy}: {strays}")
    return files


def run_pytest(copy: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "-k", "not vllm", "--rootdir", str(copy), *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def _first_failure(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    return m.group(1).split("/")[-1] if m else ""


def run(mutants: list[Mutant], timeout_s: float, keep: bool = False) -> tuple[list[Outcome], dict[str, str]]:
    copy = Path(tempfile.mkdtemp(prefix="posttrain-mutants-"))
    try:
        make_copy(copy)
        files = check_imports_resolve_to_copy(copy)
        all_tests = tuple(sorted({t for m in mutants for t in m.tests}))
        rc, output = run_pytest(copy, all_tests, timeout_s)
        if rc != 0:
            raise SystemExit(f"the unmutated suite is not green (pytest exit {rc}):\n{output[-3000:]}")
        outcomes = []
        for m in mutants:
            target = copy / m.path
            original = target.read_text()
            start = time.perf_counter()
            if original.count(m.old) != 1:
                outcomes.append(Outcome(m.name, m.what, "STALE", 0.0, f"{m.old!r} found {original.count(m.old)}x"))
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, output = run_pytest(copy, m.tests, timeout_s)
            finally:
                target.write_text(original)
            result = {0: "SURVIVED", 1: "KILLED"}.get(rc, "ERROR")
            detail = _first_failure(output) if rc == 1 else (f"pytest exit {rc}" if rc else "all tests pass")
            outcomes.append(Outcome(m.name, m.what, result, round(time.perf_counter() - start, 1), detail))
        return outcomes, files
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def table(outcomes: list[Outcome]) -> str:
    rows = [("mutant", "result", "s", "killed by"), *[(o.name, o.result, f"{o.seconds:.1f}", o.detail) for o in outcomes]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    killed = sum(o.result == "KILLED" for o in outcomes)
    lines.append(f"\n{killed}/{len(outcomes)} mutants killed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    parser.add_argument("--json", help="also write the outcomes to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    outcomes, files = run(chosen, args.timeout, args.keep)
    print(f"imports resolved to the copy: posttrain -> {files['posttrain']}")
    print(table(outcomes))
    if args.json:
        Path(args.json).write_text(json.dumps({"outcomes": [asdict(o) for o in outcomes], "imports": files}, indent=2))
    return 0 if all(o.result == "KILLED" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
