"""Build a Hugging Face `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file.

A GGUF file carries no tokenizer.json. For a byte-level BPE vocabulary
(tokenizer.ggml.model = "gpt2") it stores the token strings, their types and the merges,
plus a pre-tokenizer name (tokenizer.ggml.pre) that selects a text-splitting rule built
into llama.cpp. This module maps each supported name to the equivalent `tokenizers`
pre-tokenizer, so that the ids match those of llama.cpp and of the model's own
tokenizer.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gguf
from gguf import GGUFValueType, Keys, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

_INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # use_regex=True applies the GPT-2 pattern (contractions, then letter, number and
    # symbol runs, each with an optional leading space, then whitespace runs) before
    # mapping bytes to the byte-level alphabet.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits "smollm" text in two passes: first every character of Unicode
    # category N on its own, then the GPT-2 pattern on each piece. Digits isolates the
    # characters for which Rust's char::is_numeric holds, which is the same category N.
    # The order matters for whitespace before a digit: "x  1" becomes "x", "  ", "1",
    # so the two spaces can merge into one token.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# llama.cpp writes the GPT-2 rule as "gpt-2". "gpt2" is accepted as the same rule
# because it matches the tokenizer.ggml.model value.
# NOTE: llama.cpp turns on its clean_spaces detokenization option for "gpt-2" (not for
# "smollm"). The ByteLevel decoder has no equivalent, so decoded spacing may differ there.
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "smollm": _smollm_pre_tokenizer,
}


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: str) -> Tokenizer:
    """Build the tokenizer that a GGUF file's tokenizer.ggml.* metadata describes.

    Supports byte-level BPE vocabularies (tokenizer.ggml.model "gpt2") with the
    pre-tokenizer types "smollm" and "gpt-2" (also spelled "gpt2"). Control tokens become
    special added tokens and user-defined tokens become non-special added tokens, so both
    are matched whole in the input text. `encode` adds BOS or EOS only where the file's
    add_bos_token or add_eos_token flag is true. A missing flag counts as false, as in
    llama.cpp for these pre-tokenizer types.

    Raises ValueError, naming `path`, for an unsupported tokenizer model or pre-tokenizer
    type and for missing or malformed metadata.
    """
    model_name = _read_string(reader, Keys.Tokenizer.MODEL, path)
    if model_name != "gpt2":
        raise ValueError(
            f"GGUF file {path}: unsupported {Keys.Tokenizer.MODEL} {model_name!r}. "
            "Only 'gpt2' (byte-level BPE) is supported."
        )

    pre_type = _read_optional_string(reader, Keys.Tokenizer.PRE, path)
    build_pre_tokenizer = _PRE_TOKENIZERS.get(pre_type) if pre_type is not None else None
    if build_pre_tokenizer is None:
        supported = ", ".join(repr(name) for name in sorted(_PRE_TOKENIZERS))
        found = "missing" if pre_type is None else repr(pre_type)
        raise ValueError(
            f"GGUF file {path}: unsupported {Keys.Tokenizer.PRE} {found}. Supported values: {supported}."
        )

    tokens = _read_string_array(reader, Keys.Tokenizer.LIST, path)
    merges = _parse_merges(_read_string_array(reader, Keys.Tokenizer.MERGES, path), path)
    token_types = _read_token_types(reader, len(tokens), path)

    bpe = models.BPE(vocab=_build_vocab(tokens, path), merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = build_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    _add_marked_tokens(tokenizer, tokens, token_types)

    if _read_bool(reader, Keys.Tokenizer.ADD_PREFIX, path, default=False):
        # llama.cpp's byte-level BPE tokenization never prepends a space, regardless of
        # this flag, so the flag is ignored here too.
        logger.warning("GGUF file %s: ignoring %s=true for a byte-level BPE vocabulary", path, Keys.Tokenizer.ADD_PREFIX)

    post_processor = _build_post_processor(reader, tokens, path)
    if post_processor is not None:
        tokenizer.post_processor = post_processor

    logger.info(
        "Built tokenizer from GGUF file %s: %d tokens, %d merges, pre-tokenizer %r",
        path,
        len(tokens),
        len(merges),
        pre_type,
    )
    return tokenizer


def _build_vocab(tokens: list[str], path: str) -> dict[str, int]:
    # Every token goes into the BPE vocabulary under its stored spelling, so the added
    # tokens registered later resolve to their own ids instead of new ones.
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        previous_id = vocab.setdefault(token, token_id)
        if previous_id != token_id:
            raise ValueError(
                f"GGUF file {path}: token {token!r} appears at ids {previous_id} and {token_id} "
                f"in {Keys.Tokenizer.LIST}, but a BPE vocabulary needs unique tokens"
            )
    return vocab


def _parse_merges(merges: list[str], path: str) -> list[tuple[str, str]]:
    # Each merge is stored as "left right". Merges join byte-level tokens, which spell
    # the space byte as "Ġ", so neither side contains a space.
    pairs: list[tuple[str, str]] = []
    for rank, merge in enumerate(merges):
        left, separator, right = merge.partition(" ")
        if not separator or not left or not right or " " in right:
            raise ValueError(
                f"GGUF file {path}: merge {rank} in {Keys.Tokenizer.MERGES} is {merge!r}, "
                "but a merge must be two tokens separated by one space"
            )
        pairs.append((left, right))
    return pairs


def _add_marked_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int] | None) -> None:
    if token_types is None:
        return

    control = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TokenType.CONTROL
    ]
    # llama.cpp also matches user-defined tokens whole in the input, but it writes them
    # out when detokenizing, so they stay non-special and skip_special_tokens keeps them.
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TokenType.USER_DEFINED
    ]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)


def _build_post_processor(reader: gguf.GGUFReader, tokens: list[str], path: str) -> processors.PostProcessor | None:
    add_bos = _read_bool(reader, Keys.Tokenizer.ADD_BOS, path, default=False)
    add_eos = _read_bool(reader, Keys.Tokenizer.ADD_EOS, path, default=False)
    if not add_bos and not add_eos:
        return None

    prefix: list[tuple[str, int]] = []
    suffix: list[tuple[str, int]] = []
    if add_bos:
        prefix.append(_special_token(reader, Keys.Tokenizer.BOS_ID, tokens, path))
    if add_eos:
        suffix.append(_special_token(reader, Keys.Tokenizer.EOS_ID, tokens, path))

    # Template pieces are parsed as "token:type_id", so a token containing ":" cannot be
    # written as one.
    for token, _ in prefix + suffix:
        if ":" in token:
            raise ValueError(
                f"GGUF file {path}: cannot add special token {token!r} around the input because it contains ':'"
            )

    def template(sequence: str, type_id: int) -> list[str]:
        pieces = [f"{token}:{type_id}" for token, _ in prefix]
        pieces.append(f"{sequence}:{type_id}")
        pieces.extend(f"{token}:{type_id}" for token, _ in suffix)
        return pieces

    return processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + template("$B", 1),
        special_tokens=sorted(set(prefix + suffix), key=lambda item: item[1]),
    )


def _special_token(reader: gguf.GGUFReader, key: str, tokens: list[str], path: str) -> tuple[str, int]:
    token_id = _read_optional_int(reader, key, path)
    if token_id is None:
        raise ValueError(f"GGUF file {path}: {key} is missing, but the add flag for that token is set")
    if not 0 <= token_id < len(tokens):
        raise ValueError(f"GGUF file {path}: {key} is {token_id}, outside the vocabulary of {len(tokens)} tokens")
    return tokens[token_id], token_id


def _read_token_types(reader: gguf.GGUFReader, token_count: int, path: str) -> list[int] | None:
    field = reader.get_field(Keys.Tokenizer.TOKEN_TYPE)
    if field is None:
        logger.warning(
            "GGUF file %s: %s is missing, so no token is treated as special", path, Keys.Tokenizer.TOKEN_TYPE
        )
        return None

    if len(field.types) != 2 or field.types[0] != GGUFValueType.ARRAY or field.types[1] not in _INTEGER_TYPES:
        raise ValueError(f"GGUF file {path}: {Keys.Tokenizer.TOKEN_TYPE} is not an integer array")
    # Each numeric array element is its own part, and field.data lists their indices.
    token_types = [int(value) for index in field.data for value in field.parts[index]]
    if len(token_types) != token_count:
        raise ValueError(
            f"GGUF file {path}: {Keys.Tokenizer.TOKEN_TYPE} has {len(token_types)} entries "
            f"but {Keys.Tokenizer.LIST} has {token_count}"
        )
    return token_types


def _read_string(reader: gguf.GGUFReader, key: str, path: str) -> str:
    value = _read_optional_string(reader, key, path)
    if value is None:
        raise ValueError(f"GGUF file {path}: metadata key {key} is missing")
    return value


def _read_optional_string(reader: gguf.GGUFReader, key: str, path: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [GGUFValueType.STRING]:
        raise ValueError(f"GGUF file {path}: {key} is not a string")
    return _decode_utf8(bytes(field.parts[field.data[0]]), key, path)


def _read_string_array(reader: gguf.GGUFReader, key: str, path: str) -> list[str]:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF file {path}: metadata key {key} is missing")
    if field.types != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        raise ValueError(f"GGUF file {path}: {key} is not a string array")
    # The parts alternate between each string's length and its UTF-8 bytes, and
    # field.data lists the indices of the byte parts.
    return [_decode_utf8(bytes(field.parts[index]), key, path) for index in field.data]


def _read_optional_int(reader: gguf.GGUFReader, key: str, path: str) -> int | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if len(field.types) != 1 or field.types[0] not in _INTEGER_TYPES:
        raise ValueError(f"GGUF file {path}: {key} is not an integer")
    return int(field.parts[field.data[0]][0])


def _read_bool(reader: gguf.GGUFReader, key: str, path: str, *, default: bool) -> bool:
    field = reader.get_field(key)
    if field is None:
        return default
    if field.types != [GGUFValueType.BOOL]:
        raise ValueError(f"GGUF file {path}: {key} is not a boolean")
    return bool(field.parts[field.data[0]][0])


def _decode_utf8(raw: bytes, key: str, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"GGUF file {path}: {key} contains invalid UTF-8 ({error})") from error
