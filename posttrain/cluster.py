"""``posttrain submit``: run a recipe as a Ray job on an existing cluster.

The job carries the project (``working_dir`` = the posttrain checkout, without ``.venv``, ``runs``,
``.git``) and so the recipe; its driver runs ``posttrain run RECIPE OVERRIDES cluster.address=auto``
in ``job_dir`` (default: the directory ``posttrain submit`` was called from), so the recipe's
relative paths mean for the driver what they mean for ``posttrain run``; a relative
``run.output_dir`` is made absolute there (an explicit override, visible in the entrypoint), since
the job's actors run in the unpacked project copy. ``job_dir`` must exist on the head node (the
same machine, or a shared filesystem).

Secrets never go into recipes: ``--env NAME`` copies ``NAME`` from the submitting environment into
the job's environment, and every printed job spec is redacted.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from posttrain.config.errors import PosttrainError
from posttrain.metrics import redact

# What never travels with the job: environments, run outputs, history, caches.
EXCLUDES = [
    ".venv",
    "venv",
    "runs",
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "wandb",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_RUN_DIR_LINE = re.compile(r"^run directory: (.+)$", re.MULTILINE)


class SubmitError(PosttrainError):
    exit_code = 2


@dataclass
class JobSpec:
    """Everything ``JobSubmissionClient.submit_job`` receives, plus where the run will land."""

    entrypoint: str
    runtime_env: dict[str, Any]
    run_dir: str  # expected <job_dir>/<run.output_dir>/<run.name> (a -N suffix if it exists)
    placement: dict[str, Any] | None = None  # RL recipes: bundles per role (posttrain.rl.placement)
    metadata: dict[str, str] = field(default_factory=dict)


def project_root() -> str:
    """The posttrain checkout this code runs from (the directory holding ``pyproject.toml``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        raise SubmitError(
            f"posttrain submit: {root} is not a posttrain checkout (no pyproject.toml), so there is no project "
            "to send.\n  fix: install posttrain from a checkout (pip install -e .) or pass --working-dir"
        )
    return root


def build_job(
    recipe: str,
    overrides: list[str],
    job_dir: str | None = None,
    working_dir: str | None = None,
    env_names: tuple[str, ...] = (),
) -> JobSpec:
    """Validate the recipe here (errors surface before anything is submitted) and build the job."""
    from posttrain.config.loader import load_recipe

    working_dir = os.path.abspath(working_dir or project_root())
    job_dir = os.path.abspath(job_dir or os.getcwd())
    recipe_abs = os.path.abspath(recipe)
    rel = os.path.relpath(recipe_abs, working_dir)
    if rel.startswith(".."):
        raise SubmitError(
            f"posttrain submit: the recipe {recipe_abs} is outside the project sent with the job ({working_dir}).\n"
            f"  fix: copy the recipe under {working_dir} (e.g. recipes/), or pass --working-dir to a directory holding both"
        )
    overrides = list(overrides)
    cfg, _ = load_recipe(recipe_abs, overrides)
    if not os.path.isabs(cfg.run.output_dir):
        # Ray actors of a job run in the unpacked project copy, not in job_dir: paths the driver
        # derives from the run directory (checkpoints, the initial model) must be absolute.
        overrides = [o for o in overrides if not o.startswith("run.output_dir=")]
        overrides.append(f"run.output_dir={os.path.join(job_dir, cfg.run.output_dir)}")
    if cfg.cluster is not None and not any(o.startswith("cluster.address=") for o in overrides):
        overrides.append("cluster.address=auto")  # an RL recipe: its driver joins the cluster
    cfg, _ = load_recipe(recipe_abs, overrides)
    placement = None
    if cfg.cluster is not None:
        from posttrain.rl.placement import describe_placement

        placement = describe_placement(cfg.cluster, cfg.rollout, cfg.trainer.world_size)
    env_vars = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}  # the driver's ray.init may add actor env vars
    for name in env_names:
        if name not in os.environ:
            raise SubmitError(
                f"posttrain submit: --env {name}: {name} is not set here.\n  fix: export {name}=... before submitting"
            )
        env_vars[name] = os.environ[name]
    # The job starts in the unpacked copy of working_dir; remember it, then run where paths resolve.
    args = " ".join(shlex.quote(o) for o in overrides)
    entrypoint = (f'PROJECT="$PWD" && {find_posttrain_shell()} && cd {shlex.quote(job_dir)} && '
                  f'$POSTTRAIN run "$PROJECT"/{shlex.quote(rel)} {args}').rstrip()
    run_dir = os.path.join(job_dir, cfg.run.output_dir, cfg.run.name)
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    return JobSpec(
        entrypoint,
        runtime_env,
        os.path.normpath(run_dir),
        placement,
        {"recipe": rel, "run_name": cfg.run.name},
    )


NOT_FOUND_EXIT = 127


def find_posttrain_shell(python: str | None = None) -> str:
    """Shell that sets ``$POSTTRAIN`` on the cluster: ``posttrain`` when the cluster's PATH has it,
    else this interpreter's ``-m posttrain.cli`` when the head node can run it (the same machine
    or a shared filesystem); otherwise it prints the cause and the fix and exits 127."""
    exe = shlex.quote(python or sys.executable)
    fix = ("posttrain: not found on the Ray cluster (not on its PATH, and " + (python or sys.executable)
           + " is not there).  fix: start the cluster from the environment that has posttrain "
           "(e.g. `. .venv/bin/activate && ray start --head ...`), or pip install posttrain on every node")
    return (f'if command -v posttrain >/dev/null 2>&1; then POSTTRAIN=posttrain; '
            f'elif [ -x {exe} ] && {exe} -c "import posttrain.cli" >/dev/null 2>&1; then POSTTRAIN="{exe} -m posttrain.cli"; '
            f'else echo {shlex.quote(fix)} >&2; exit {NOT_FOUND_EXIT}; fi')


def auth_headers() -> dict[str, str]:
    """An ``Authorization`` header for a cluster with Ray's token auth, when a token is at hand
    (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, as Ray looks
    them up) and this process's Ray would not add one itself (``RAY_AUTH_MODE`` unset: Ray's
    client then sends none, and a token-auth cluster answers 401)."""
    if (os.environ.get("RAY_AUTH_MODE") or "").lower() in ("token", "disabled"):
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def describe_job(spec: JobSpec) -> dict[str, Any]:
    """The job spec as printed by ``--dry-run`` (secret-looking env vars redacted)."""
    out: dict[str, Any] = {
        "entrypoint": spec.entrypoint,
        "runtime_env": {**spec.runtime_env, "env_vars": redact(spec.runtime_env["env_vars"])},
        "run_dir": spec.run_dir,
    }
    if spec.placement is not None:
        out["placement"] = spec.placement
    return out


def client(address: str | None):
    """A JobSubmissionClient for ``address`` (None: RAY_API_SERVER_ADDRESS / RAY_ADDRESS / local)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except AuthenticationError as err:
        raise SubmitError(_auth_failed(address, err)) from None
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise SubmitError(
            f"posttrain submit: cannot reach the Ray job server at {address or 'the default address'}: {err}\n"
            "  fix: pass --address http://HEAD:8265 (the dashboard address; the cluster needs the dashboard, "
            "started with --dashboard-host=127.0.0.1 and reached through an SSH tunnel when remote)"
        ) from err


def submit(spec: JobSpec, address: str | None) -> tuple[Any, str]:
    """Submit; returns (client, job id)."""
    from ray.exceptions import AuthenticationError

    c = client(address)
    try:
        job_id = c.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata)
    except AuthenticationError as err:
        raise SubmitError(_auth_failed(address, err)) from None
    return c, job_id


def _auth_failed(address: str | None, err: Exception) -> str:
    return (
        f"posttrain submit: the Ray cluster at {address or 'the default address'} refused the request: it uses "
        f"token authentication and the token sent was missing or wrong ({getattr(err, 'message', err)}).\n"
        "  fix: make the cluster's token available here: export RAY_AUTH_TOKEN=<token>, or "
        "RAY_AUTH_TOKEN_PATH=<file> (a local cluster started by `ray start` or posttrain keeps it in ~/.ray/auth_token)"
    )


def wait(c, job_id: str, echo: bool = True) -> tuple[str, str]:
    """Follow the job's logs (printed as they come when ``echo``) until it ends; returns (status, logs)."""
    import asyncio

    async def follow() -> None:
        async for chunk in c.tail_job_logs(job_id):
            if echo:
                print(chunk, end="", flush=True)

    asyncio.run(follow())
    status = c.get_job_status(job_id)
    while status.value not in TERMINAL:  # the log stream can close a moment before the status flips
        time.sleep(0.5)
        status = c.get_job_status(job_id)
    return status.value, c.get_job_logs(job_id)


def run_dir_from_logs(logs: str) -> str | None:
    """The run directory ``posttrain run`` printed (exact, with any -N suffix), if it got that far."""
    found = _RUN_DIR_LINE.findall(logs)
    return found[-1].strip() if found else None
