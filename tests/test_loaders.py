"""Model loading: checkpoint formats, the hub path, unusable model files and start-up failures.

Every expected value comes from `transformers` running the same weights, or from loading
the same weights a second way. No test compares against numbers the service produced earlier.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from service.core.locations import RESID_FINAL
from service.core.residual import ResidualStream
from service.loaders import LoadedModel, load_model
from service.loaders.errors import ModelFileError
from tests.conftest import Checkpoint, assert_close

PROMPT_IDS = [5, 80, 17, 250, 3, 99, 42, 7]
TOKENIZER_SAMPLES = [
    "The capital of France is Paris.",
    "  leading spaces, trailing spaces  ",
    "Gradients: 0123456789 and Jacobian-vector products!",
    "café naïve 🙂 words outside the training corpus",
]
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
HUB_REPO_ID = "example-org/tiny-gpt2"
# A generous limit, because three interpreters import torch at once on a shared machine.
# A process still running when this limit expires has hung instead of exiting.
CLI_TIMEOUT_SECONDS = 120


def compute_logits(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    model = loaded.model
    stream = ResidualStream(model, torch.tensor(token_ids))
    with torch.no_grad():
        return model.logits(stream.at(RESID_FINAL))


def reference_logits(checkpoint: Checkpoint, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = checkpoint.reference(torch.tensor([token_ids])).logits[0]
    return logits


def copy_checkpoint(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write `state` as safetensors, or with `torch.save` (the format of older checkpoints) for a `.bin` name."""
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path), metadata={"format": "pt"})


def edit_config(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def random_bytes(size: int) -> bytes:
    return random.Random(0).randbytes(size)


@pytest.fixture(scope="module")
def gpt2_weights(tiny_gpt2: Checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_gpt2.directory / "model.safetensors"))


def gpt2_with_weights(tiny_gpt2: Checkpoint, directory: Path, state: dict[str, torch.Tensor], filename: str) -> Path:
    """Copy the tiny GPT-2 checkpoint with its model.safetensors replaced by `state` in `filename`."""
    copy_checkpoint(tiny_gpt2.directory, directory)
    (directory / "model.safetensors").unlink()
    save_weights(state, directory / filename)
    return directory


# GPT-2 checkpoints


def test_gpt2_safetensors_matches_transformers(tiny_gpt2: Checkpoint) -> None:
    loaded = load_model(str(tiny_gpt2.directory))

    assert loaded.model.config.architecture == "gpt2"
    assert_close(compute_logits(loaded, PROMPT_IDS), reference_logits(tiny_gpt2, PROMPT_IDS), "logits")


def test_gpt2_pytorch_bin_matches_safetensors(
    tiny_gpt2: Checkpoint, gpt2_weights: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    directory = gpt2_with_weights(tiny_gpt2, tmp_path / "checkpoint", gpt2_weights, "pytorch_model.bin")
    assert not list(directory.glob("*.safetensors"))

    loaded = load_model(str(directory))

    logits = compute_logits(loaded, PROMPT_IDS)
    assert torch.equal(logits, compute_logits(tiny_gpt2.loaded, PROMPT_IDS))
    assert_close(logits, reference_logits(tiny_gpt2, PROMPT_IDS), "logits")


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_gpt2_keys_without_prefix_load(
    tiny_gpt2: Checkpoint, gpt2_weights: dict[str, torch.Tensor], tmp_path: Path, filename: str
) -> None:
    # The original GPT-2 checkpoints name tensors without the `transformer.` prefix and
    # store each layer's causal mask as `h.N.attn.bias`. Checkpoints saved by older
    # transformers versions also carry the scalar buffer `h.N.attn.masked_bias`.
    state = {name.removeprefix("transformer."): tensor for name, tensor in gpt2_weights.items()}
    n_positions = tiny_gpt2.reference.config.n_positions
    for layer in range(tiny_gpt2.reference.config.n_layer):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions))[None, None]
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(name.startswith("transformer.") for name in state)
    directory = gpt2_with_weights(tiny_gpt2, tmp_path / "checkpoint", state, filename)

    loaded = load_model(str(directory))

    logits = compute_logits(loaded, PROMPT_IDS)
    assert torch.equal(logits, compute_logits(tiny_gpt2.loaded, PROMPT_IDS))
    assert_close(logits, reference_logits(tiny_gpt2, PROMPT_IDS), "logits")


@pytest.fixture(scope="module")
def gpt2_bpe_files(tiny_gpt2: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny GPT-2 checkpoint with its tokenizer as vocab.json and merges.txt instead of tokenizer.json."""
    directory = copy_checkpoint(tiny_gpt2.directory, tmp_path_factory.mktemp("bpe-files") / "checkpoint")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))
    (directory / "tokenizer.json").unlink()
    assert (directory / "vocab.json").is_file()
    assert (directory / "merges.txt").is_file()
    return load_model(str(directory))


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_bpe_files_match_tokenizer_json(tiny_gpt2: Checkpoint, gpt2_bpe_files: LoadedModel, text: str) -> None:
    ids = gpt2_bpe_files.tokenizer.encode(text).ids

    assert ids == tiny_gpt2.loaded.tokenizer.encode(text).ids
    assert gpt2_bpe_files.tokenizer.decode(ids) == text


# Llama checkpoints


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama weights re-saved by transformers in shards of at most 20 KB, with an index."""
    directory = tmp_path_factory.mktemp("sharded-llama")
    tiny_llama.reference.save_pretrained(directory, max_shard_size="20KB")
    shutil.copy(tiny_llama.directory / "tokenizer.json", directory)
    return directory


def test_llama_sharded_files_written(sharded_llama: Path) -> None:
    assert (sharded_llama / "model.safetensors.index.json").is_file()
    assert not (sharded_llama / "model.safetensors").exists()
    assert len(list(sharded_llama.glob("model-*-of-*.safetensors"))) > 1


def test_llama_sharded_matches_transformers(tiny_llama: Checkpoint, sharded_llama: Path) -> None:
    loaded = load_model(str(sharded_llama))

    logits = compute_logits(loaded, PROMPT_IDS)
    assert_close(logits, reference_logits(tiny_llama, PROMPT_IDS), "logits")
    assert torch.equal(logits, compute_logits(tiny_llama.loaded, PROMPT_IDS))


# Hub model ids


class FakeSnapshotDownload:
    """A stand-in for `huggingface_hub.snapshot_download` that records its calls.

    It copies the files of a local checkpoint that match `allow_patterns` into a fresh
    snapshot directory, or raises `error` when one is given.
    """

    def __init__(self, repository: Path, snapshot: Path, error: Exception | None = None) -> None:
        self.repository = repository
        self.snapshot = snapshot
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, repo_id: str, **options: Any) -> str:
        self.calls.append((repo_id, options))
        if self.error is not None:
            raise self.error
        patterns = options.get("allow_patterns") or ["*"]
        self.snapshot.mkdir(exist_ok=True)
        for file in self.repository.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in patterns):
                shutil.copy(file, self.snapshot)
        return str(self.snapshot)


def install_fake_hub(
    monkeypatch: pytest.MonkeyPatch, repository: Path, snapshot: Path, error: Exception | None = None
) -> FakeSnapshotDownload:
    fake = FakeSnapshotDownload(repository, snapshot, error)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def download_patterns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Return the allow_patterns the loader passes for a hub id, read from a failed fake download."""
    fake = install_fake_hub(monkeypatch, tmp_path, tmp_path / "snapshot", OSError("no network in this test"))
    with pytest.raises(ModelFileError):
        load_model(HUB_REPO_ID)
    return list(fake.calls[0][1]["allow_patterns"])


def test_hub_id_downloads_and_loads(tiny_gpt2: Checkpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = install_fake_hub(monkeypatch, tiny_gpt2.directory, tmp_path / "snapshot")

    loaded = load_model(HUB_REPO_ID)

    assert len(fake.calls) == 1
    repo_id, options = fake.calls[0]
    assert repo_id == HUB_REPO_ID
    assert options.get("allow_patterns")
    assert loaded.model_id == HUB_REPO_ID
    assert torch.equal(compute_logits(loaded, PROMPT_IDS), compute_logits(tiny_gpt2.loaded, PROMPT_IDS))


@pytest.mark.parametrize(
    "filename",
    [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
    ],
)
def test_hub_patterns_include_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, filename: str) -> None:
    patterns = download_patterns(monkeypatch, tmp_path)

    assert any(fnmatch.fnmatch(filename, pattern) for pattern in patterns), patterns


@pytest.mark.parametrize("filename", ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "README.md"])
def test_hub_patterns_skip_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, filename: str) -> None:
    patterns = download_patterns(monkeypatch, tmp_path)

    assert not any(fnmatch.fnmatch(filename, pattern) for pattern in patterns), patterns


def test_hub_pytorch_bin_only_loads(
    tiny_gpt2: Checkpoint, gpt2_weights: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repository = gpt2_with_weights(tiny_gpt2, tmp_path / "repository", gpt2_weights, "pytorch_model.bin")
    install_fake_hub(monkeypatch, repository, tmp_path / "snapshot")

    loaded = load_model(HUB_REPO_ID)

    assert torch.equal(compute_logits(loaded, PROMPT_IDS), compute_logits(tiny_gpt2.loaded, PROMPT_IDS))


HUB_DOWNLOAD_ERRORS = [
    pytest.param(LocalEntryNotFoundError("offline mode is enabled and the file is not cached"), id="offline"),
    pytest.param(ConnectionError("connection refused"), id="connection"),
    pytest.param(OSError("disk full"), id="os_error"),
]


@pytest.mark.parametrize("error", HUB_DOWNLOAD_ERRORS)
def test_hub_download_failure_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception) -> None:
    fake = install_fake_hub(monkeypatch, tmp_path, tmp_path / "snapshot", error)

    with pytest.raises(ModelFileError) as caught:
        load_model(HUB_REPO_ID)

    message = str(caught.value)
    assert len(fake.calls) == 1
    assert HUB_REPO_ID in message
    assert "download" in message
    assert type(error).__name__ in message


@pytest.mark.parametrize("source", ["/absent/model-dir", "./absent-model-dir", "~/absent-model-dir"])
def test_local_path_skips_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str) -> None:
    fake = install_fake_hub(monkeypatch, tmp_path, tmp_path / "snapshot")

    with pytest.raises(ModelFileError) as caught:
        load_model(source)

    assert fake.calls == []
    assert str(Path(source).expanduser()) in str(caught.value)


# Unusable model files


@dataclass
class BadFile:
    """What `load_model(source)` must raise: a message naming `named` and containing each phrase."""

    source: Path
    named: Path
    phrases: tuple[str, ...]


def absent_directory(directory: Path) -> BadFile:
    absent = directory.parent / "absent-checkpoint"
    return BadFile(absent, absent, ("not found",))


def config_missing(directory: Path) -> BadFile:
    (directory / "config.json").unlink()
    return BadFile(directory, directory / "config.json", ("not found",))


def config_not_json(directory: Path) -> BadFile:
    (directory / "config.json").write_text('{"model_type": "gpt2",')
    return BadFile(directory, directory / "config.json", ("not valid JSON",))


def config_not_object(directory: Path) -> BadFile:
    (directory / "config.json").write_text("[1, 2]")
    return BadFile(directory, directory / "config.json", ("expected a JSON object",))


def model_type_unknown(directory: Path) -> BadFile:
    edit_config(directory, lambda config: config.update(model_type="bert"))
    return BadFile(directory, directory / "config.json", ("'bert'", "not supported"))


def model_type_missing(directory: Path) -> BadFile:
    edit_config(directory, lambda config: config.pop("model_type"))
    return BadFile(directory, directory / "config.json", ("model_type",))


def weights_missing(directory: Path) -> BadFile:
    (directory / "model.safetensors").unlink()
    return BadFile(directory, directory, ("no model.safetensors",))


def safetensors_truncated(directory: Path) -> BadFile:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return BadFile(directory, path, ("could not be read",))


def safetensors_lfs_pointer(directory: Path) -> BadFile:
    # What a `git clone` without git-lfs leaves in place of the weights.
    path = directory / "model.safetensors"
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize 548105171\n")
    return BadFile(directory, path, ("could not be read",))


def tensor_wrong_shape(directory: Path) -> BadFile:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    name = "transformer.h.0.mlp.c_fc.weight"
    original = tuple(state[name].shape)
    state[name] = state[name][:, : original[1] // 2].contiguous()
    save_weights(state, path)
    return BadFile(directory, path, (name, str(tuple(state[name].shape)), f"expected {original}"))


def tensor_missing(directory: Path) -> BadFile:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    name = "transformer.h.1.ln_2.bias"
    del state[name]
    save_weights(state, path)
    return BadFile(directory, path, ("missing", name))


def tensor_unexpected(directory: Path) -> BadFile:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    name = "transformer.h.1.attn.extra_scale"
    state[name] = torch.ones(4)
    save_weights(state, path)
    return BadFile(directory, path, ("unexpected", name))


def pytorch_bin_truncated(directory: Path) -> BadFile:
    path = directory / "pytorch_model.bin"
    safetensors_path = directory / "model.safetensors"
    torch.save(load_file(str(safetensors_path)), path)
    safetensors_path.unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return BadFile(directory, path, ("could not be read",))


def pytorch_bin_not_pickle(directory: Path) -> BadFile:
    path = directory / "pytorch_model.bin"
    (directory / "model.safetensors").unlink()
    path.write_bytes(random_bytes(4096))
    return BadFile(directory, path, ("could not be read",))


def gguf_missing(directory: Path) -> BadFile:
    path = directory / "absent.gguf"
    return BadFile(path, path, ("not found",))


def gguf_not_gguf(directory: Path) -> BadFile:
    path = directory / "random.gguf"
    path.write_bytes(random_bytes(4096))
    return BadFile(path, path, ("not a readable GGUF file",))


def tokenizer_missing(directory: Path) -> BadFile:
    (directory / "tokenizer.json").unlink()
    return BadFile(directory, directory, ("no tokenizer.json",))


def tokenizer_not_json(directory: Path) -> BadFile:
    (directory / "tokenizer.json").write_text("{not json")
    return BadFile(directory, directory / "tokenizer.json", ("could not be read",))


def shard_missing(directory: Path) -> BadFile:
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    return BadFile(directory, shard, ("not found",))


def shard_truncated(directory: Path) -> BadFile:
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return BadFile(directory, shard, ("could not be read",))


def index_without_weight_map(directory: Path) -> BadFile:
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    return BadFile(directory, index, ("weight_map is empty",))


BAD_FILES = [
    pytest.param(
        "gpt2",
        absent_directory,
        id="directory_absent",
    ),
    pytest.param("gpt2", config_missing, id="config_missing"),
    pytest.param("gpt2", config_not_json, id="config_not_json"),
    pytest.param("gpt2", config_not_object, id="config_not_object"),
    pytest.param("gpt2", model_type_unknown, id="model_type_unknown"),
    pytest.param("gpt2", model_type_missing, id="model_type_missing"),
    pytest.param("gpt2", weights_missing, id="weights_missing"),
    pytest.param("gpt2", safetensors_truncated, id="safetensors_truncated"),
    pytest.param("gpt2", safetensors_lfs_pointer, id="safetensors_lfs_pointer"),
    pytest.param("gpt2", tensor_wrong_shape, id="tensor_wrong_shape"),
    pytest.param("gpt2", tensor_missing, id="tensor_missing"),
    pytest.param("gpt2", tensor_unexpected, id="tensor_unexpected"),
    pytest.param("gpt2", pytorch_bin_truncated, id="pytorch_bin_truncated"),
    pytest.param(
        "gpt2",
        pytorch_bin_not_pickle,
        id="pytorch_bin_not_pickle",
    ),
    pytest.param("gpt2", gguf_missing, id="gguf_missing"),
    pytest.param("gpt2", gguf_not_gguf, id="gguf_not_gguf"),
    pytest.param("gpt2", tokenizer_missing, id="tokenizer_missing"),
    pytest.param(
        "gpt2",
        tokenizer_not_json,
        id="tokenizer_not_json",
    ),
    pytest.param("llama_sharded", shard_missing, id="shard_missing"),
    pytest.param("llama_sharded", shard_truncated, id="shard_truncated"),
    pytest.param("llama_sharded", index_without_weight_map, id="index_without_weight_map"),
]


@pytest.fixture
def checkpoint_directories(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """Return a function from a checkpoint name to its intact source directory."""

    def directory(name: str) -> Path:
        if name == "llama_sharded":
            sharded: Path = request.getfixturevalue("sharded_llama")
            return sharded
        checkpoint: Checkpoint = request.getfixturevalue(f"tiny_{name}")
        return checkpoint.directory

    return directory


@pytest.mark.parametrize(("checkpoint", "break_files"), BAD_FILES)
def test_bad_files_raise(
    checkpoint_directories: Callable[[str], Path],
    tmp_path: Path,
    checkpoint: str,
    break_files: Callable[[Path], BadFile],
) -> None:
    directory = copy_checkpoint(checkpoint_directories(checkpoint), tmp_path / "checkpoint")
    case = break_files(directory)

    with pytest.raises(ModelFileError) as caught:
        load_model(str(case.source))

    message = str(caught.value)
    assert str(case.named) in message
    for phrase in case.phrases:
        assert phrase in message


@pytest.mark.parametrize(
    ("checkpoint", "key"),
    [
        ("gpt2", "n_embd"),
        ("gpt2", "n_head"),
        ("gpt2", "n_layer"),
        ("gpt2", "vocab_size"),
        ("llama", "hidden_size"),
        ("llama", "num_attention_heads"),
        ("llama", "num_hidden_layers"),
        ("llama", "intermediate_size"),
        ("llama", "vocab_size"),
    ],
)
def test_config_missing_key_raises(
    checkpoint_directories: Callable[[str], Path], tmp_path: Path, checkpoint: str, key: str
) -> None:
    directory = copy_checkpoint(checkpoint_directories(checkpoint), tmp_path / "checkpoint")
    edit_config(directory, lambda config: config.pop(key))

    with pytest.raises(ModelFileError) as caught:
        load_model(str(directory))

    message = str(caught.value)
    assert str(directory / "config.json") in message
    assert "missing" in message
    assert repr(key) in message


# Start-up failures on the command line


CLI_CASES = {
    "model_absent": ["--model", "/nonexistent/dir", "--port", "0"],
    "bfloat16_on_cpu": ["--device", "cpu", "--dtype", "bfloat16"],
}
if not torch.cuda.is_available():
    # With a GPU present this would start a real server, so it runs only where CUDA is absent.
    CLI_CASES["cuda_without_gpu"] = ["--device", "cuda"]


@dataclass
class CliRun:
    returncode: int | None  # None: still running after CLI_TIMEOUT_SECONDS, then killed
    stderr: str


@dataclass
class CliProcess:
    process: subprocess.Popen[bytes]
    stderr_path: Path


@pytest.fixture(scope="module", autouse=True)
def cli_processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, CliProcess]]:
    """Start every command-line case when the module starts, so their imports overlap the other tests.

    Nothing starts when no selected test reads `cli_runs`. Every process still running at
    the end of the module is killed.
    """
    if not any("cli_runs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield {}
        return
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SERVICE_")}
    environment["HF_HUB_OFFLINE"] = "1"
    logs = tmp_path_factory.mktemp("cli-logs")
    processes: dict[str, CliProcess] = {}
    try:
        for name, arguments in CLI_CASES.items():
            # stderr goes to a file, so a process never blocks on a full pipe while other tests run.
            stderr_path = logs / f"{name}.stderr"
            with stderr_path.open("wb") as stderr:
                process = subprocess.Popen(
                    [sys.executable, "-m", "service", "--host", "127.0.0.1", *arguments],
                    cwd=REPOSITORY_ROOT,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            processes[name] = CliProcess(process, stderr_path)
        yield processes
    finally:
        for started in processes.values():
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()


@pytest.fixture(scope="module")
def cli_runs(cli_processes: dict[str, CliProcess]) -> dict[str, CliRun]:
    """Wait for every command-line case to exit, killing any that run past CLI_TIMEOUT_SECONDS."""
    runs: dict[str, CliRun] = {}
    for name, started in cli_processes.items():
        try:
            returncode: int | None = started.process.wait(timeout=CLI_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            started.process.kill()
            started.process.wait()
            returncode = None
        runs[name] = CliRun(returncode, started.stderr_path.read_text(errors="replace"))
    return runs


def test_cli_absent_model_exits(cli_runs: dict[str, CliRun]) -> None:
    run = cli_runs["model_absent"]

    assert run.returncode is not None, f"still running after {CLI_TIMEOUT_SECONDS} s:\n{run.stderr}"
    assert run.returncode != 0, run.stderr
    assert "/nonexistent/dir" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch finds no CUDA device")
def test_cli_cuda_without_gpu_exits(cli_runs: dict[str, CliRun]) -> None:
    run = cli_runs["cuda_without_gpu"]

    assert run.returncode == 2, run.stderr
    assert "'cuda'" in run.stderr
    assert "no CUDA device" in run.stderr


def test_cli_bfloat16_on_cpu_exits(cli_runs: dict[str, CliRun]) -> None:
    run = cli_runs["bfloat16_on_cpu"]

    assert run.returncode == 2, run.stderr
    assert "bfloat16" in run.stderr
    assert "CUDA device" in run.stderr
