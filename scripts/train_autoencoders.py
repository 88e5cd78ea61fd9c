"""Train TopK sparse autoencoders on SmolLM2-135M-Instruct MLP outputs and save them in SAELens format.

Usage, from the repository root:

    mkdir -p ~/.cache/attribution-service
    (cd ~/.cache/attribution-service && apt-get download r-cran-janeaustenr=1.0.0-1)
    .venv/bin/python scripts/train_autoencoders.py

The corpus is Jane Austen's six novels as shipped by Debian's `r-cran-janeaustenr`
package. The script reads the novels straight from the downloaded .deb (or from the
package's installed tree), so neither R nor the roughly 700 packages that installing it
pulls in are needed. Persuasion is held out for evaluation, and the other five novels
are the training text.

For every layer in --layers the script trains one TopK autoencoder on the MLP's write
to the residual stream (`resid_delta_mlp`, SAELens hook `blocks.{L}.hook_mlp_out`). It
writes `service/data/autoencoders/smollm2-mlp-out-L{L}/` with `cfg.json` and float16
`sae_weights.safetensors`. Then it reloads the float16 file and measures the fraction of
variance explained and the mean L0 on held-out text. See docs/autoencoders.md for the
settings and the measured numbers.

The first token of each window is left out of training and evaluation, because the
first position of every prompt is an attention sink whose activations do not look like
those of later tokens.
"""

from __future__ import annotations

import os

# OpenMP threads that busy-wait slow small tensor operations down when other processes
# share the cores (an elementwise add took about 100 times longer with torch 2.13 on two
# busy cores), so let them sleep instead. The variable has to be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import lzma
import random
import re
import struct
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from service.loaders import EMBEDDED_MODEL_ID, load_model
from service.model.base import Transformer

logger = logging.getLogger("train_autoencoders")

REPO_ROOT = Path(__file__).resolve().parent.parent

CORPUS_PACKAGE = "r-cran-janeaustenr"
CORPUS_VERSION = "1.0.0-1"
CORPUS_DEB_NAME = f"{CORPUS_PACKAGE}_{CORPUS_VERSION}_all.deb"
DEFAULT_CORPUS_DIR = Path("~/.cache/attribution-service")
INSTALLED_CORPUS_DIR = Path("/usr/lib/R/site-library/janeaustenr")
# Path, inside the package, of the lazy-load database (`.rdx` index and `.rdb` data) that
# contains one R object per novel.
RDATA_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# SHA-256 of the six novels as read from version 1.0.0-1, joined in name order by
# `corpus_digest`. A different digest means other text and so other autoencoders.
CORPUS_SHA256 = "81cacb4dc19396db1f15e5add50b3e9315eb993482a569a7c098af00deaca4c4"
HELD_OUT_NOVEL = "persuasion"


# ---------------------------------------------------------------------------------------
# Corpus: Jane Austen's novels from the Debian package's R data files.
# ---------------------------------------------------------------------------------------


class RSerializationReader:
    """A reader for R's XDR serialization format (versions 2 and 3), as written by saveRDS.

    It decodes the object types that data packages of plain vectors use: NULL, symbols,
    pairlists (attributes), character, logical, integer, double and generic vectors and
    back-references. Other types raise ValueError. Vectors come back as Python lists
    (strings, with None for NA) or tuples (numbers); a vector with attributes comes back
    as `RVector`.
    """

    NILVALUE = 254
    REFERENCE = 255
    SYMBOL = 1
    PAIRLIST = 2
    CHARACTER_ELEMENT = 9
    LOGICAL = 10
    INTEGER = 13
    DOUBLE = 14
    CHARACTER = 16
    LIST = 19

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0
        self.references: list[Any] = []

    def read_int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.position)
        self.position += 4
        return int(value)

    def read_object(self) -> Any:
        if self.data[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization: starts with {self.data[:2]!r}")
        self.position = 2
        version = self.read_int()
        self.read_int()  # R version that wrote the data
        self.read_int()  # minimal R version that can read it
        if version == 3:
            encoding_length = self.read_int()
            self.position += encoding_length
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self.read_item()

    def read_length(self) -> int:
        length = self.read_int()
        if length == -1:  # long vector: the length follows as two 32-bit halves
            upper = self.read_int()
            lower = self.read_int()
            length = (upper << 32) + lower
        return length

    def read_item(self) -> Any:
        flags = self.read_int()
        kind = flags & 0xFF
        has_attributes = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind == self.NILVALUE:
            return None
        if kind == self.REFERENCE:
            index = flags >> 8
            if index == 0:
                index = self.read_int()
            return self.references[index - 1]
        if kind == self.SYMBOL:
            symbol = RSymbol(self.read_item())
            self.references.append(symbol)
            return symbol
        if kind == self.PAIRLIST:
            attributes = self.read_item() if has_attributes else None
            tag = self.read_item() if has_tag else None
            del attributes
            head = (tag.name if isinstance(tag, RSymbol) else None, self.read_item())
            tail = self.read_item()
            return [head] + (tail or [])
        if kind == self.CHARACTER_ELEMENT:
            length = self.read_int()
            if length == -1:
                return None  # NA_character_
            text = self.data[self.position : self.position + length].decode("utf-8")
            self.position += length
            return text
        if kind in (self.CHARACTER, self.LIST, self.LOGICAL, self.INTEGER, self.DOUBLE):
            values = self.read_vector(kind, self.read_length())
            if has_attributes:
                return RVector(values, dict(self.read_item()))
            return values
        raise ValueError(f"unsupported R object type {kind} at byte {self.position - 4}")

    def read_vector(self, kind: int, length: int) -> Any:
        if kind in (self.CHARACTER, self.LIST):
            return [self.read_item() for _ in range(length)]
        if kind == self.DOUBLE:
            numbers = struct.unpack_from(f">{length}d", self.data, self.position)
            self.position += 8 * length
            return numbers
        numbers = struct.unpack_from(f">{length}i", self.data, self.position)
        self.position += 4 * length
        return numbers


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass(frozen=True)
class RVector:
    """An R vector with attributes, such as a named list."""

    values: Any
    attributes: dict[str | None, Any]

    def named(self) -> dict[str, Any]:
        return dict(zip(self.attributes["names"], self.values, strict=True))


def read_lazyload_database(index_bytes: bytes, database_bytes: bytes) -> dict[str, Any]:
    """Decode an R lazy-load database (the `.rdx` index and `.rdb` data) into named objects.

    The index is a gzip-compressed serialized list whose `variables` entry maps each
    object name to an (offset, length) pair in the data file. Each entry there is a
    4-byte big-endian uncompressed length followed by a zlib stream.
    """
    index = RSerializationReader(gzip.decompress(index_bytes)).read_object()
    if not isinstance(index, RVector):
        raise ValueError("lazy-load index is not a named list")
    variables = index.named()["variables"].named()

    objects: dict[str, Any] = {}
    for name, (offset, length) in variables.items():
        entry = database_bytes[offset : offset + length]
        (expected_size,) = struct.unpack(">i", entry[:4])
        serialized = zlib.decompress(entry[4:])
        if len(serialized) != expected_size:
            raise ValueError(f"lazy-load entry {name!r}: {len(serialized)} bytes, expected {expected_size}")
        objects[name] = RSerializationReader(serialized).read_object()
    return objects


def read_deb_member(deb_path: Path, member_name: str) -> bytes:
    """Return one file from the data archive of a Debian package, without dpkg.

    A .deb is an `ar` archive whose `data.tar.*` member is the file tree.
    """
    with deb_path.open("rb") as deb:
        if deb.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb_path} is not a Debian package (ar archive)")
        while header := deb.read(60):
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii"))
            body = deb.read(size)
            if size % 2:
                deb.read(1)  # ar pads members to an even size
            if name.startswith("data.tar"):
                return read_tar_member(name, body, member_name, deb_path)
    raise ValueError(f"{deb_path} has no data.tar member")


def read_tar_member(archive_name: str, body: bytes, member_name: str, deb_path: Path) -> bytes:
    if archive_name.endswith(".xz"):
        body = lzma.decompress(body)
    elif archive_name.endswith(".gz"):
        body = gzip.decompress(body)
    elif archive_name != "data.tar":
        raise ValueError(f"{deb_path}: unsupported compression of {archive_name}")
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        for candidate in (member_name, "./" + member_name):
            try:
                extracted = archive.extractfile(candidate)
            except KeyError:
                continue
            if extracted is not None:
                return extracted.read()
    raise ValueError(f"{deb_path} does not contain {member_name}")


def locate_corpus(corpus: Path | None) -> Path:
    """Return the .deb or installed package directory to read, or exit with the fetch command."""
    if corpus is not None:
        candidates = [corpus.expanduser()]
    else:
        candidates = [DEFAULT_CORPUS_DIR.expanduser() / CORPUS_DEB_NAME, INSTALLED_CORPUS_DIR]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    download_dir = DEFAULT_CORPUS_DIR if corpus is None else corpus.expanduser().parent
    raise SystemExit(
        f"corpus not found at {' or '.join(str(path) for path in candidates)}. "
        f"Download the Debian package with:\n"
        f"    mkdir -p {download_dir} && (cd {download_dir} && apt-get download {CORPUS_PACKAGE}={CORPUS_VERSION})\n"
        f"and pass --corpus {download_dir}/{CORPUS_DEB_NAME} if that is not the default location."
    )


def read_novels(source: Path) -> dict[str, str]:
    """Read the six novels from the package's .deb or installed tree, as raw text by object name.

    The package stores each novel as an R character vector with one element per line of
    the Project Gutenberg text, front matter and licence header already removed.
    """
    if source.is_dir():
        data_dir = source / "data"
        index_bytes = (data_dir / "Rdata.rdx").read_bytes()
        database_bytes = (data_dir / "Rdata.rdb").read_bytes()
    else:
        index_bytes = read_deb_member(source, RDATA_MEMBER + ".rdx")
        database_bytes = read_deb_member(source, RDATA_MEMBER + ".rdb")

    novels: dict[str, str] = {}
    for name, lines in sorted(read_lazyload_database(index_bytes, database_bytes).items()):
        if not isinstance(lines, list) or not all(line is None or isinstance(line, str) for line in lines):
            logger.info("skipping R object %r: not a character vector", name)
            continue
        novels[name] = "\n".join(line or "" for line in lines)
    return novels


def corpus_digest(novels: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(novels):
        digest.update(name.encode() + b"\0" + novels[name].encode() + b"\0")
    return digest.hexdigest()


def join_paragraphs(text: str) -> str:
    """Undo the fixed-width line wrapping: one line per paragraph, paragraphs split by a blank line."""
    paragraphs = (re.sub(r"\s+", " ", block).strip() for block in re.split(r"\n\s*\n", text))
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------


def split_windows(token_ids: list[int], context_size: int) -> list[list[int]]:
    """Cut a token sequence into consecutive, non-overlapping windows; a short tail is dropped."""
    starts = range(0, len(token_ids) - context_size + 1, context_size)
    return [token_ids[start : start + context_size] for start in starts]


@torch.no_grad()
def collect_mlp_outputs(
    model: Transformer, windows: list[list[int]], layers: list[int], label: str
) -> dict[int, Tensor]:
    """Run each window through the model and return each layer's MLP output, [tokens, d_model].

    The loop adds the sub-layer outputs to the residual stream in the same order as
    `service.core.residual.ResidualStream`, but keeps the MLP outputs it computes instead
    of recomputing them from resid_mid, and stops after the deepest requested layer.
    Position 0 of every window is dropped (see the module docstring).
    """
    per_window = len(windows[0]) - 1
    outputs = {layer: torch.empty(len(windows) * per_window, model.config.d_model) for layer in layers}
    started = time.monotonic()
    last_logged = started
    for index, window in enumerate(windows):
        rows = slice(index * per_window, (index + 1) * per_window)
        resid = model.embed(torch.tensor(window))
        for layer in range(max(layers) + 1):
            resid = resid + model.attention_sublayer(layer, resid).out
            mlp_out = model.mlp_sublayer(layer, resid).out
            if layer in outputs:
                outputs[layer][rows] = mlp_out[1:]
            resid = resid + mlp_out

        now = time.monotonic()
        if now - last_logged >= 30 or index + 1 == len(windows):
            tokens = (index + 1) * per_window
            logger.info(
                "%s activations: %d/%d windows, %.0f tokens/s", label, index + 1, len(windows), tokens / (now - started)
            )
            last_logged = now
    return outputs


def activation_cache_path(cache_dir: Path, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir.expanduser() / f"mlp-out-{key}.pt"


# ---------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------


class SelectedPreActivations(torch.autograd.Function):
    """Gather chosen entries of pre = (x - b_dec) @ encoder_rows.T + b_enc, with a sparse backward.

    The forward pass reads the entries from `pre`, the [batch, d_sae] pre-activations
    already computed without autograd. Autograd through the dense product would spend two
    [batch, d_sae, d_in] matrix products on a gradient that is zero outside the chosen
    entries, so the backward pass builds it from the [batch, n] chosen entries with a
    sparse product instead.
    """

    @staticmethod
    def forward(pre: Tensor, x: Tensor, b_dec: Tensor, encoder_rows: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
        return pre.gather(1, indices)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        _, x, b_dec, encoder_rows, _, indices = inputs
        ctx.save_for_backward(x, b_dec, encoder_rows, indices)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, b_dec, encoder_rows, indices = ctx.saved_tensors
        batch, n = indices.shape
        d_sae = encoder_rows.shape[0]
        flat_indices = indices.reshape(-1)
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype).index_add_(0, flat_indices, grad.reshape(-1))
        token_ids = torch.arange(batch).repeat_interleave(n)
        grad_pre = torch.sparse_coo_tensor(
            torch.stack([flat_indices, token_ids]), grad.reshape(-1), (d_sae, batch), check_invariants=False
        )
        grad_encoder_rows = torch.sparse.mm(grad_pre, x - b_dec)
        grad_b_dec = -(grad_b_enc @ encoder_rows)
        return None, None, grad_b_dec, grad_encoder_rows, grad_b_enc, None


class TopKAutoencoder(nn.Module):
    """A TopK sparse autoencoder with b_dec subtracted from the input before encoding.

    encode: pre = (x - b_dec) @ W_enc + b_enc; keep the k largest entries of pre, ReLU them
    and set the rest to zero. decode: latents @ W_dec + b_dec. Rows of W_dec have unit norm.
    The encoder is stored transposed, as `encoder_rows` [d_sae, d_in] (W_enc = encoder_rows.T),
    so that the rows of the selected latents can be gathered with `embedding`.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, data_mean: Tensor, generator: torch.Generator) -> None:
        super().__init__()
        self.k = k
        directions = torch.randn(d_sae, d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(directions)
        self.encoder_rows = nn.Parameter(directions.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(data_mean.clone())

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return all pre-activations [batch, d_sae], without autograd, and the top-k indices [batch, k]."""
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.encoder_rows.T)
            return pre, pre.topk(self.k, dim=-1).indices

    def selected_values(self, pre: Tensor, x: Tensor, indices: Tensor) -> Tensor:
        """Return the activations [batch, n] of the latents in `indices`, ReLU applied, with autograd.

        `pre` contains the pre-activations of `x` that `select` returned.
        """
        chosen: Tensor = SelectedPreActivations.apply(  # type: ignore[no-untyped-call]
            pre, x, self.b_dec, self.encoder_rows, self.b_enc, indices
        )
        return chosen.relu()

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        # embedding_bag sums the selected decoder rows, weighted, without building the
        # dense [batch, d_sae] latent matrix, and its backward touches only those rows.
        summed = nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return summed + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def remove_parallel_decoder_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would only change the row's norm."""
        assert self.W_dec.grad is not None
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec


@dataclass(frozen=True)
class TrainingSettings:
    d_sae: int
    k: int
    epochs: int
    batch_size: int
    learning_rate: float
    aux_k: int
    aux_coefficient: float
    dead_after_tokens: int
    seed: int


def train_autoencoder(activations: Tensor, settings: TrainingSettings, layer: int) -> TopKAutoencoder:
    """Train one autoencoder on [tokens, d_in] activations and return it in the activations' units.

    Training runs on activations divided by their root-mean-square distance from the mean,
    so the learning rate does not depend on the layer's activation scale. The scale is
    folded back into b_enc and b_dec at the end, which leaves W_enc, the unit-norm W_dec
    and the choice of active latents unchanged.
    """
    generator = torch.Generator().manual_seed(settings.seed + layer)
    mean = activations.mean(dim=0)
    scale = float((activations - mean).pow(2).sum(dim=1).mean().sqrt())
    data = activations / scale

    autoencoder = TopKAutoencoder(data.shape[1], settings.d_sae, settings.k, mean / scale, generator)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.learning_rate, fused=True)
    steps_per_epoch = data.shape[0] // settings.batch_size
    total_steps = steps_per_epoch * settings.epochs
    # The learning rate stays constant, then falls linearly to zero over the last fifth of training.
    decay_steps = max(1, total_steps - int(0.8 * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (total_steps - step) / decay_steps))
    tokens_since_fired = torch.zeros(settings.d_sae, dtype=torch.long)

    started = time.monotonic()
    for epoch in range(settings.epochs):
        order = torch.randperm(data.shape[0], generator=generator)
        squared_error = 0.0
        aux_total = 0.0
        for step in range(steps_per_epoch):
            batch = data[order[step * settings.batch_size : (step + 1) * settings.batch_size]]
            pre, indices = autoencoder.select(batch)
            values = autoencoder.selected_values(pre, batch, indices)
            error = batch - autoencoder.decode(values, indices)
            loss = error.pow(2).sum(dim=1).mean()

            tokens_since_fired += batch.shape[0]
            tokens_since_fired[indices[values > 0]] = 0
            dead = tokens_since_fired >= settings.dead_after_tokens
            if dead.any():
                aux_loss = auxiliary_loss(autoencoder, batch, pre, error, dead, settings.aux_k)
                loss = loss + settings.aux_coefficient * aux_loss
                aux_total += float(aux_loss)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            autoencoder.remove_parallel_decoder_gradient()
            optimizer.step()
            scheduler.step()
            autoencoder.normalize_decoder()
            squared_error += float(error.detach().pow(2).sum())

        # The training data has unit mean squared distance from its mean, so this is about
        # 1 - FVE, averaged over an epoch in which the weights keep changing.
        unexplained = squared_error / (steps_per_epoch * settings.batch_size)
        logger.info(
            "layer %d epoch %d/%d: training FVE %.3f, AuxK loss %.3f, dead latents %d/%d, %.0f s",
            layer,
            epoch + 1,
            settings.epochs,
            1 - unexplained,
            aux_total / steps_per_epoch,
            int(dead.sum()),
            settings.d_sae,
            time.monotonic() - started,
        )

    with torch.no_grad():
        autoencoder.b_enc.mul_(scale)
        autoencoder.b_dec.mul_(scale)
    return autoencoder


def auxiliary_loss(
    autoencoder: TopKAutoencoder, batch: Tensor, pre: Tensor, error: Tensor, dead: Tensor, aux_k: int
) -> Tensor:
    """Return the AuxK loss: how well the top dead latents alone reconstruct the main reconstruction error.

    It gives latents that stopped firing a gradient towards directions the live latents
    miss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093).
    The squared error is divided by the error's own squared norm.

    NOTE: the ReLU blocks the gradient of a dead latent whose pre-activation is negative
    on every token of the batch. In the run behind docs/autoencoders.md all dead latents
    were in that state, so this loss stayed at 1.0 and revived none of them.
    """
    dead_ids = dead.nonzero().squeeze(1)
    _, positions = pre[:, dead_ids].topk(min(aux_k, dead_ids.numel()), dim=-1)
    indices = dead_ids[positions]
    estimate = nn.functional.embedding_bag(
        indices, autoencoder.W_dec, per_sample_weights=autoencoder.selected_values(pre, batch, indices), mode="sum"
    )
    target = error.detach()
    return (target - estimate).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------
# SAELens files and evaluation
# ---------------------------------------------------------------------------------------


def save_weights(autoencoder: TopKAutoencoder, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sae_weights.safetensors"
    tensors = {
        "W_enc": autoencoder.encoder_rows.detach().T.to(torch.float16).contiguous(),
        "b_enc": autoencoder.b_enc.detach().to(torch.float16).contiguous(),
        "W_dec": autoencoder.W_dec.detach().to(torch.float16).contiguous(),
        "b_dec": autoencoder.b_dec.detach().to(torch.float16).contiguous(),
    }
    save_file(tensors, str(path))
    return path


@torch.no_grad()
def evaluate_saved(path: Path, k: int, activations: Tensor) -> dict[str, float]:
    """Measure FVE and mean L0 of the saved float16 weights on [tokens, d_in] activations.

    The computation runs in float32. FVE is 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.
    """
    weights = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
    pre = (activations - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    values = values.relu()
    latents = torch.zeros_like(pre).scatter_(1, indices, values)
    reconstruction = latents @ weights["W_dec"] + weights["b_dec"]
    residual = (activations - reconstruction).pow(2).sum()
    total = (activations - activations.mean(dim=0)).pow(2).sum()
    return {
        "fve": float(1 - residual / total),
        "mean_l0": float((latents > 0).sum(dim=1).float().mean()),
        "dead_latent_fraction": float(((latents > 0).sum(dim=0) == 0).float().mean()),
    }


def write_config(directory: Path, layer: int, args: argparse.Namespace, metadata: dict[str, Any]) -> None:
    """Write cfg.json with the keys SAELens reads for a TopK autoencoder, plus provenance."""
    config = {
        "architecture": "topk",
        "d_in": metadata["d_in"],
        "d_sae": args.d_sae,
        "k": args.k,
        "activation_fn_kwargs": {"k": args.k},
        "hook_name": f"blocks.{layer}.hook_mlp_out",
        "hook_layer": layer,
        "hook_head_index": None,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "dtype": "float16",
        "device": "cpu",
        "model_name": EMBEDDED_MODEL_ID,
        "context_size": args.context_size,
        "prepend_bos": False,
        "dataset_path": f"debian:{CORPUS_PACKAGE}={CORPUS_VERSION}",
        "metadata": metadata,
    }
    (directory / "cfg.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help=f"path of {CORPUS_DEB_NAME} or of the installed janeaustenr R package directory "
        f"(default: {DEFAULT_CORPUS_DIR / CORPUS_DEB_NAME}, then {INSTALLED_CORPUS_DIR})",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO_ROOT / "service" / "data" / "autoencoders",
        help="folder for the autoencoder folders "
        "(default: service/data/autoencoders/, where the service loads them from)",
    )

    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[6, 15, 24],
        help="layers to train an autoencoder for (default: %(default)s)",
    )
    parser.add_argument(
        "--context-size",
        type=int,
        default=128,
        help="tokens per window, position 0 included (default: %(default)s)",
    )
    parser.add_argument(
        "--train-tokens",
        type=int,
        default=128_000,
        help="training tokens per layer (rounded down to windows) (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=10_000,
        help="held-out tokens per layer (rounded down to windows) (default: %(default)s)",
    )

    parser.add_argument("--d-sae", type=int, default=2048, help="number of latents (default: %(default)s)")
    parser.add_argument("--k", type=int, default=64, help="active latents per token (default: %(default)s)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="passes over the training activations (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per optimizer step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=6e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--aux-k",
        type=int,
        default=256,
        help="dead latents used by the AuxK loss (default: %(default)s)",
    )
    parser.add_argument(
        "--aux-coefficient",
        type=float,
        default=1 / 32,
        help="weight of the AuxK loss (default: %(default)s)",
    )
    parser.add_argument(
        "--dead-after-tokens",
        type=int,
        default=20_000,
        help="a latent that has not fired for this many training tokens counts as dead for the AuxK loss "
        "(default: %(default)s)",
    )

    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the window order, initialization and batches (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--activation-cache",
        type=Path,
        default=None,
        help="folder to store collected activations in and reuse them from on a rerun with the same settings",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()

    source = locate_corpus(args.corpus)
    logger.info("reading the corpus from %s", source)
    novels = read_novels(source)
    digest = corpus_digest(novels)
    if digest != CORPUS_SHA256:
        logger.warning(
            "corpus SHA-256 is %s, expected %s: results will differ from docs/autoencoders.md", digest, CORPUS_SHA256
        )
    if HELD_OUT_NOVEL not in novels:
        raise SystemExit(f"{source} has no novel named {HELD_OUT_NOVEL!r}; found {sorted(novels)}")

    loaded = load_model("smollm2")
    model = loaded.model.eval()
    invalid_layers = [layer for layer in args.layers if not 0 <= layer < model.config.n_layers]
    if invalid_layers:
        raise SystemExit(f"invalid --layers {invalid_layers}: the model has layers 0 to {model.config.n_layers - 1}")
    train_windows, eval_windows = select_windows(novels, loaded.tokenizer, args)
    per_window = args.context_size - 1

    activations = load_or_collect(model, train_windows, eval_windows, args, digest)
    collected = time.monotonic()

    settings = TrainingSettings(
        d_sae=args.d_sae,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        aux_k=args.aux_k,
        aux_coefficient=args.aux_coefficient,
        dead_after_tokens=args.dead_after_tokens,
        seed=args.seed,
    )
    results: dict[int, dict[str, float]] = {}
    for layer in args.layers:
        layer_started = time.monotonic()
        autoencoder = train_autoencoder(activations["train"][layer], settings, layer)
        directory = args.output_dir / f"smollm2-mlp-out-L{layer}"
        weights_path = save_weights(autoencoder, directory)
        results[layer] = evaluate_saved(weights_path, args.k, activations["eval"][layer])
        metadata = {
            "d_in": model.config.d_model,
            "model_source": loaded.source.rsplit("/", 1)[-1],
            "corpus": "Jane Austen's six novels (Project Gutenberg texts, public domain) "
            f"from Debian package {CORPUS_PACKAGE} {CORPUS_VERSION} (MIT)",
            "corpus_sha256": digest,
            "held_out_text": HELD_OUT_NOVEL,
            "training_tokens": len(train_windows) * per_window,
            "held_out_tokens": len(eval_windows) * per_window,
            "first_position_excluded": True,
            "training": {
                **dataclasses.asdict(settings),
                "optimizer": "Adam",
                "learning_rate_schedule": "linear decay over last 20%",
            },
            "held_out_fve": round(results[layer]["fve"], 4),
            "held_out_mean_l0": round(results[layer]["mean_l0"], 2),
            "training_seconds": round(time.monotonic() - layer_started, 1),
            "script": "scripts/train_autoencoders.py",
        }
        write_config(directory, layer, args, metadata)
        logger.info(
            "layer %d: held-out FVE %.3f, mean L0 %.1f, dead latents %.1f%%, written to %s",
            layer,
            results[layer]["fve"],
            results[layer]["mean_l0"],
            100 * results[layer]["dead_latent_fraction"],
            directory,
        )

    finished = time.monotonic()
    logger.info(
        "done in %.0f s: %.0f s loading the corpus and model and collecting activations, %.0f s training",
        finished - started,
        collected - started,
        finished - collected,
    )
    for layer, result in results.items():
        logger.info("layer %d: held-out FVE %.3f at mean L0 %.1f", layer, result["fve"], result["mean_l0"])
    return 0


def select_windows(
    novels: dict[str, str], tokenizer: Tokenizer, args: argparse.Namespace
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize the novels and return the shuffled training and held-out windows that the run uses."""
    window_counts: dict[str, int] = {}
    train_windows: list[list[int]] = []
    eval_windows: list[list[int]] = []
    for name, text in novels.items():
        windows = split_windows(tokenizer.encode(join_paragraphs(text)).ids, args.context_size)
        window_counts[name] = len(windows)
        (eval_windows if name == HELD_OUT_NOVEL else train_windows).extend(windows)
    shuffler = random.Random(args.seed)
    shuffler.shuffle(train_windows)
    shuffler.shuffle(eval_windows)
    per_window = args.context_size - 1
    train_windows = train_windows[: args.train_tokens // per_window]
    eval_windows = eval_windows[: args.eval_tokens // per_window]
    if len(train_windows) * per_window < args.batch_size:
        raise SystemExit(
            f"--train-tokens {args.train_tokens} gives {len(train_windows) * per_window} tokens, "
            f"fewer than one batch of {args.batch_size}; raise --train-tokens or lower --batch-size"
        )
    if not eval_windows:
        raise SystemExit(f"--eval-tokens {args.eval_tokens} is less than one window of {per_window} tokens")
    logger.info(
        "corpus: %d tokens in %d-token windows (%s); using %d training and %d held-out windows",
        sum(window_counts.values()) * args.context_size,
        args.context_size,
        ", ".join(f"{name} {count}" for name, count in window_counts.items()),
        len(train_windows),
        len(eval_windows),
    )
    return train_windows, eval_windows


def load_or_collect(
    model: Transformer,
    train_windows: list[list[int]],
    eval_windows: list[list[int]],
    args: argparse.Namespace,
    digest: str,
) -> dict[str, dict[int, Tensor]]:
    cache_path = None
    if args.activation_cache is not None:
        cache_settings = {
            "corpus": digest,
            "layers": args.layers,
            "context_size": args.context_size,
            "train_windows": len(train_windows),
            "eval_windows": len(eval_windows),
            "seed": args.seed,
        }
        cache_path = activation_cache_path(args.activation_cache, cache_settings)
        if cache_path.exists():
            logger.info("reading activations from %s", cache_path)
            cached: dict[str, dict[int, Tensor]] = torch.load(cache_path)
            return cached

    activations = {
        "eval": collect_mlp_outputs(model, eval_windows, args.layers, "held-out"),
        "train": collect_mlp_outputs(model, train_windows, args.layers, "training"),
    }
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(activations, cache_path)
        logger.info("stored activations in %s", cache_path)
    return activations


if __name__ == "__main__":
    sys.exit(main())
