"""``posttrain`` command line: run, submit, plot, rewards.

    posttrain run recipes/sft_tiny_arith.yaml trainer.max_steps=50 [--dry-run]
    posttrain submit recipes/grpo_tiny_arith.yaml --address http://127.0.0.1:8265 --wait
    posttrain plot runs/sft_tiny_arith
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

import yaml

from posttrain.config.errors import PosttrainError


def _make_run_dir(output_dir: str, name: str, resuming: bool) -> str:
    """``<output_dir>/<name>``; an existing run is never overwritten (a suffix is added). A directory
    that a failed start left (only ``config.yaml``, no metrics or checkpoints) is reused, so the next
    attempt and its ``checkpoint.resume=auto`` keep the name."""
    from posttrain.engine.checkpoint import run_has_started

    base = os.path.join(output_dir, name)
    if resuming or not os.path.exists(base) or not run_has_started(base):
        os.makedirs(base, exist_ok=True)
        return base
    i = 1
    while os.path.exists(f"{base}-{i}"):
        i += 1
    os.makedirs(f"{base}-{i}")
    return f"{base}-{i}"


def _resume_line(cfg, recipe: str, overrides: list[str]) -> str:
    """What the run will resume from, in one line; an error when ``resume=auto`` would silently
    start over while a suffixed sibling (``<name>-N``) holds the checkpoints."""
    from posttrain.config.errors import ConfigError
    from posttrain.config.preflight import key_source
    from posttrain.engine.checkpoint import resume_point

    base = os.path.join(cfg.run.output_dir, cfg.run.name)
    point = resume_point(cfg.checkpoint.resume, os.path.join(base, "checkpoints"))
    if point is not None:
        path, step = point
        return f"resuming from step {step} (checkpoint {path})" if step >= 0 else f"resuming from checkpoint {path}"
    parent = cfg.run.output_dir if os.path.isdir(cfg.run.output_dir) else None
    siblings = sorted(
        (d for d in os.listdir(parent) if d.startswith(cfg.run.name + "-") and d[len(cfg.run.name) + 1 :].isdigit()),
        key=lambda d: int(d.rsplit("-", 1)[1]),
    ) if parent else []
    held = [d for d in siblings if resume_point("auto", os.path.join(parent, d, "checkpoints"))]
    if held:
        newest = held[-1]
        raise ConfigError(
            "checkpoint.resume", key_source("checkpoint.resume", recipe, overrides),
            f"'auto' finds no checkpoint in {base}, but {os.path.join(parent, newest)} has some "
            "(an earlier start of this run was given a -N suffix)",
            f"add run.name={newest} to resume that run, or set checkpoint.resume=null to start over in {base}",
        )
    return f"checkpoint.resume=auto: no checkpoint in {base}/checkpoints yet, starting from step 0"


def _resume_command(recipe: str, overrides: list[str], run_dir: str) -> str:
    keep = [o for o in overrides if not o.startswith(("checkpoint.resume=", "run.name="))]
    return " ".join(["posttrain run", recipe, *keep, f"run.name={os.path.basename(run_dir)}", "checkpoint.resume=auto"])


def derived_counts(cfg) -> dict[str, Any]:
    """Counts a user should see before starting: per step, per run, and how they relate."""
    from posttrain.data.sources import load_rows
    from posttrain.data.templates import apply_templates
    from posttrain.models.loading import load_tokenizer

    if hasattr(cfg.algorithm, "derived_counts"):
        return cfg.algorithm.derived_counts(cfg)
    t = cfg.trainer
    tok = apply_templates(load_tokenizer(cfg.model), cfg.data)  # token counts in the run's format
    algo = cfg.algorithm.build()
    rows = load_rows(cfg.data.train, "data.train", cfg.data.fields)
    examples, _ = algo.prepare(rows, tok, cfg.data.max_length, cfg.data.max_bad_fraction, "data.train")
    probe = [algo.collate([e], tok.pad_token_id) for e in examples[:256]]
    mean_tokens = sum(float(b["attention_mask_BT"].sum()) for b in probe) / max(1, len(probe))
    return {
        "train_examples": len(examples),
        "samples_per_step": t.global_batch_size,
        "micro_batch_size_per_rank": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "ranks": t.world_size,
        "optimizer_steps": t.max_steps,
        "epochs": round(t.max_steps * t.global_batch_size / max(1, len(examples)), 3),
        "tokens_per_step": round(mean_tokens * t.global_batch_size),
    }


def cmd_run(args: argparse.Namespace) -> int:
    from posttrain.config.errors import ConfigError
    from posttrain.config.loader import load_recipe
    from posttrain.config.preflight import check_before_start, key_source
    from posttrain.logfiles import off_terminal, route_library_logs
    from posttrain.metrics import quiet_library_logs, redact
    from posttrain.run_record import check_resume_identity, write_config

    cfg, resolved = load_recipe(args.recipe, args.overrides)
    quiet_library_logs(cfg.logging.verbose)
    check_before_start(cfg, args.recipe, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(redact(resolved), sort_keys=False))
        print("# derived counts")
        print(yaml.safe_dump(derived_counts(cfg), sort_keys=False))
        print(_memory_plan(cfg))
        return 0
    resume_line = _resume_line(cfg, args.recipe, args.overrides) if cfg.checkpoint.resume else None
    if cfg.checkpoint.resume:  # before anything is written: a resume must be the same run
        check_resume_identity(os.path.join(cfg.run.output_dir, cfg.run.name), redact(resolved),
                              key_source("checkpoint.resume", args.recipe, args.overrides))
    try:
        run_dir = _make_run_dir(cfg.run.output_dir, cfg.run.name, bool(cfg.checkpoint.resume))
        previous_record = write_config(run_dir, redact(resolved))
    except OSError as exc:
        raise ConfigError(
            "run.output_dir", key_source("run.output_dir", args.recipe, args.overrides),
            f"cannot create the run directory: {exc.strerror or exc} ({exc.filename})",
            "set run.output_dir to a directory you can write, e.g. run.output_dir=runs",
        ) from None
    print(f"run directory: {run_dir}", flush=True)
    if resume_line:
        print(resume_line, flush=True)
    with contextlib.ExitStack() as stack:
        if not cfg.logging.verbose:  # off a terminal: library logs to <run_dir>/logs, posttrain's lines here
            stack.callback(route_library_logs(os.path.abspath(run_dir)))
            if off_terminal():
                print(f"library logs: {os.path.join(run_dir, 'logs')}", flush=True)
        summary = _run_recorded(cfg, resolved, run_dir, previous_record, args)
    if summary is None:
        return 130
    _print_summary(summary)
    return 0


def _run_recorded(cfg, resolved, run_dir: str, previous_record: str | None, args: argparse.Namespace):
    """The runner, with the record put back if it fails; None after a Ctrl-C (its message printed)."""
    from posttrain.run_record import restore_on_failure

    with restore_on_failure(run_dir, previous_record), _interrupts_stop_cleanly():
        try:
            # Absolute: actors of a cluster run elsewhere (the job's project copy, the node's
            # working dir); checkpoints and hf/ must land where the driver's files do.
            return _runner_for(cfg)(cfg, resolved, os.path.abspath(run_dir))
        except KeyboardInterrupt:
            print(interrupted_message(run_dir, _resume_command(args.recipe, args.overrides, run_dir)),
                  file=sys.stderr, flush=True)
            return None


def interrupted_message(run_dir: str, resume_command: str) -> str:
    """What a Ctrl-C prints: the checkpoint a resume would take, or that there is none yet."""
    from posttrain.engine.checkpoint import discard_partial, resume_point

    discard_partial(os.path.join(run_dir, "checkpoints"))  # a save the Ctrl-C cut short
    point = resume_point("auto", os.path.join(run_dir, "checkpoints"))
    if point is None:
        return (f"posttrain: interrupted; no checkpoint yet in {run_dir}/checkpoints, so a rerun starts from step 0.\n"
                f"  rerun: {resume_command}")
    path, step = point
    return (f"posttrain: interrupted; the newest checkpoint is step {step} ({path}).\n"
            f"  resume: {resume_command}")


def _runner_for(cfg):
    """The algorithm's runner (online RL declares one); offline algorithms share one."""
    runner = getattr(cfg.algorithm, "runner", None)
    if runner is None:
        from posttrain.offline.runner import run_offline as runner
    elif isinstance(runner, str):  # an import path: the algorithm's config does not import its driver
        from posttrain.config.targets import import_object

        runner = import_object(runner, "algorithm._target_", "recipe")
    return runner


class _interrupts_stop_cleanly:
    """The first Ctrl-C raises KeyboardInterrupt (the run stops, cleanup runs); another one while
    it cleans up only says so, and a third exits at once, so no traceback comes from cleanup code."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._signal, self._presses, self._old = signal, 0, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._presses += 1
        if self._presses == 1:
            raise KeyboardInterrupt
        if self._presses == 2:
            print("posttrain: stopping (cleaning up workers); press Ctrl-C again to exit at once", file=sys.stderr, flush=True)
            return
        os._exit(130)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            self._signal.signal(self._signal.SIGINT, self._old)


def _print_summary(summary: dict[str, Any]) -> None:
    before, after = summary.get("before", {}), summary.get("after", {})
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{key}: before {fmt(b)}  after {fmt(a)}")
    print(json.dumps({"summary": summary}))


def _memory_plan(cfg) -> str:
    """The per-device memory plan of ``cfg`` (posttrain.plan), as printed by ``plan`` and ``--dry-run``."""
    from posttrain.plan import plan_recipe, render

    return render(plan_recipe(cfg))


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the per-device memory plan from the model's config.json alone; exit 5 when a GPU recipe
    does not fit (a report, not an error: 2, 3 and 4 stay config, data and model errors)."""
    from posttrain.config.loader import load_recipe
    from posttrain.plan import plan_recipe, render

    cfg, _ = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(cfg)
    print(render(plan))
    return 0 if plan.fits or not plan.inputs.on_gpu else 5


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a recipe as a Ray job (posttrain.cluster); --wait follows its logs to the end."""
    from posttrain import cluster

    spec = cluster.build_job(args.recipe, args.overrides, args.job_dir, args.working_dir, tuple(args.env))
    if args.dry_run:
        print(yaml.safe_dump(cluster.describe_job(spec), sort_keys=False, default_flow_style=None))
        return 0
    client, job_id = cluster.submit(spec, args.address)
    where = f" --address {args.address}" if args.address else ""
    print(f"job id: {job_id}")
    print(f"logs: ray job logs {job_id}{where}  (head node: <ray temp dir>/session_latest/logs/job-driver-{job_id}.log)")
    print(f"run directory: {spec.run_dir} (a -N suffix is added if it already exists)")
    if not args.wait:
        print(f"status: ray job status {job_id}{where}")
        return 0
    status, logs = cluster.wait(client, job_id)
    print(f"job {job_id}: {status}")
    print(f"run directory: {cluster.run_dir_from_logs(logs) or spec.run_dir}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from posttrain.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _recipe_reward_graph(recipe: str, overrides: list[str]):
    from posttrain.config.errors import ConfigError
    from posttrain.config.loader import load_recipe

    cfg, _ = load_recipe(recipe, overrides)
    if cfg.reward is None:
        raise ConfigError("reward", recipe, "this recipe has no reward graph", "use an online-RL or rejection-sampling recipe")
    return cfg.reward


def cmd_rewards_show(args: argparse.Namespace) -> int:
    from posttrain.rewards.inspect import show_graph, write_graph_picture

    graph_cfg = _recipe_reward_graph(args.recipe, args.overrides)
    print(show_graph(graph_cfg))
    if args.out:
        print(f"picture: {write_graph_picture(graph_cfg, args.out)}")
    return 0


def cmd_rollouts_show(args: argparse.Namespace) -> int:
    from posttrain.rl.agent_show import read_trajectories, render

    color = {"always": True, "never": False}.get(args.color, sys.stdout.isatty())
    print(render(read_trajectories(args.run_dir), args.limit, args.version, color), end="")
    return 0


def cmd_rewards_try(args: argparse.Namespace) -> int:
    from posttrain.config.errors import DataError
    from posttrain.rewards.inspect import try_graph

    graph_cfg = _recipe_reward_graph(args.recipe, args.overrides)
    if not os.path.isfile(args.input):
        raise DataError(f"--input '{args.input}' does not exist.\n  fix: give a .jsonl file of {{prompt, completion, ...fields}} rows")
    rows = []
    with open(args.input) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"--input {args.input} line {number} is not valid JSON ({exc.msg}, column {exc.colno}).\n"
                                "  fix: write one JSON object per line: {\"prompt\": ..., \"completion\": ..., ...fields}") from None
            if not isinstance(row, dict):
                raise DataError(f"--input {args.input} line {number} is a JSON {type(row).__name__}, not an object.\n"
                                "  fix: write one JSON object per line: {\"prompt\": ..., \"completion\": ..., ...fields}")
            rows.append((number, row))
    if not rows:
        raise DataError(f"--input {args.input} holds no rows.\n  fix: write one JSON object per line: {{prompt, completion, ...fields}}")
    bad = [n for n, r in rows if not {"prompt", "completion"} <= set(r)]
    if bad:
        raise DataError(f"--input lines {bad[:5]} lack 'prompt' or 'completion'.\n  fix: every row needs both, plus the fields the reward nodes read")
    for result in try_graph(graph_cfg, [r for _, r in rows]):
        print(_try_line(result))
    return 0


def _try_line(result: dict[str, Any]) -> str:
    """One scored row: the reward, then each node's value and status, and why a node errored."""
    parts = []
    for name, cell in result["nodes"].items():
        text = f"{name}={cell['value']!r}({cell['status']})"
        if cell.get("error"):
            text += f" [{cell['error']}]"
        parts.append(text)
    return f"reward={result['reward']!r} masked={result['masked']}  {'  '.join(parts)}  | {result['completion'][:40]!r}"


def cmd_export(args: argparse.Namespace) -> int:
    from posttrain.export import check_run_dir, export_checkpoint, is_lora_run
    from posttrain.models.lora_export import export_merged

    check_run_dir(args.run_dir)
    if args.step is not None:
        print(f"checkpoint step {args.step}: {export_checkpoint(args.run_dir, args.step, args.out, args.merge)}")
        return 0
    hf = os.path.join(args.run_dir, "hf")
    if not args.merge:
        if is_lora_run(args.run_dir):
            print(f"{hf} holds this LoRA run's adapter (PEFT format); add --merge for the merged model, --step N for a checkpoint")
        else:
            print(f"{hf} holds this run's full model (written at the end of the run); add --step N to export a checkpoint")
        return 0
    print(f"merged model: {export_merged(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training: SFT, DPO, reward models, PPO, GRPO")
    p.add_argument("--version", action="version", version=f"posttrain {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe: posttrain run recipes/X.yaml key=value ...")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax); group=option selects a config group")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and derived counts, then exit")
    r.set_defaults(fn=cmd_run)
    pn = sub.add_parser("plan", help="per-device memory plan of a recipe (config.json only, no weights); exit 5 if it does not fit")
    pn.add_argument("recipe")
    pn.add_argument("overrides", nargs="*", help="key=value overrides, as for run")
    pn.set_defaults(fn=cmd_plan)
    sb = sub.add_parser("submit", help="run a recipe as a Ray job: posttrain submit recipes/X.yaml key=value ... [--wait]")
    sb.add_argument("recipe")
    sb.add_argument("overrides", nargs="*", help="key=value overrides, as for run; RL recipes get cluster.address=auto")
    sb.add_argument("--address", default=None, help="Ray job server (dashboard) address, e.g. http://127.0.0.1:8265; default: RAY_ADDRESS")
    sb.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 only if it SUCCEEDED")
    sb.add_argument("--dry-run", action="store_true", help="print the job (entrypoint, runtime env, run dir, placement) and exit")
    sb.add_argument("--job-dir", default=None, help="directory the job's driver runs in (default: here); must exist on the head node")
    sb.add_argument("--working-dir", default=None, help="project sent with the job (default: this posttrain checkout)")
    sb.add_argument("--env", action="append", default=[], metavar="NAME", help="copy env var NAME (e.g. a secret) into the job")
    sb.set_defaults(fn=cmd_submit)
    pl = sub.add_parser("plot", help="write PNG curves of a run's metrics")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None)
    pl.set_defaults(fn=cmd_plot)
    ex = sub.add_parser("export", help="export a run's model: posttrain export RUN_DIR [--step N] [--merge] (LoRA: the merged model)")
    ex.add_argument("run_dir")
    ex.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base and write a full model")
    ex.add_argument("--step", type=int, default=None, help="export checkpoint step N (default: the end-of-run export RUN_DIR/hf)")
    ex.add_argument("--out", default=None, help="output directory (default: RUN_DIR/hf_merged, or RUN_DIR/hf_step_N)")
    ex.set_defaults(fn=cmd_export)
    rw = sub.add_parser("rewards", help="inspect a recipe's reward graph without training")
    rsub = rw.add_subparsers(dest="rewards_command", required=True)
    show = rsub.add_parser("show", help="print the reward graph (and draw it with --out graph.png)")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--out", default=None, help="picture path (.png, .svg, or .dot for graphviz text)")
    show.set_defaults(fn=cmd_rewards_show)
    tr = rsub.add_parser("try", help="score given completions and print the per-node breakdown")
    tr.add_argument("recipe")
    tr.add_argument("overrides", nargs="*")
    tr.add_argument("--input", required=True, help="jsonl rows: {prompt, completion, ...dataset fields}")
    tr.set_defaults(fn=cmd_rewards_try)
    ro = sub.add_parser("rollouts", help="inspect a run's multi-turn trajectories")
    rosub = ro.add_subparsers(dest="rollouts_command", required=True)
    rs = rosub.add_parser("show", help="print trajectories with their turns and loss masks coloured")
    rs.add_argument("run_dir")
    rs.add_argument("--limit", type=int, default=4, help="how many trajectories (the latest)")
    rs.add_argument("--version", type=int, default=None, help="only those generated by this policy version")
    rs.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    rs.set_defaults(fn=cmd_rollouts_show)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("posttrain")
    except PackageNotFoundError:
        from posttrain import __version__

        return __version__


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit code) when ``exc`` is, wraps or was caused by an error the user can fix (a
    PosttrainError, or a reward error, also when it comes back from a Ray actor); None otherwise."""
    from posttrain.rewards.errors import RewardConfigError, RewardError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # Ray's RayTaskError: the actor's own exception
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if isinstance(exc, PosttrainError):
            return str(exc), exc.exit_code
        if isinstance(exc, RewardError):
            return str(exc).strip(), 2 if isinstance(exc, RewardConfigError) else 1
        exc = exc.__cause__
    return None


def main(argv: list[str] | None = None) -> int:
    from posttrain.logfiles import quiet_console_env

    quiet_console_env()  # off a terminal: no progress bars, colours or banners (before the libraries load)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]  # overrides may come after --dry-run
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if os.getcwd() not in sys.path:  # reward modules and tasks in the current directory import
        sys.path.insert(0, os.getcwd())
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    try:
        return args.fn(args)
    except Exception as err:
        known = user_error(err)
        if known is None:
            raise
        message, code = known
        print(f"posttrain: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
