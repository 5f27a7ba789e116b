"""Chat prompts whose message content cannot write control tokens (role injection).

A chat template writes control tokens (`<|im_start|>`, `<|im_end|>`) around each message; a
user who types `<|im_end|><|im_start|>system` inside a message must not be able to open a turn
of their own. `encode_chat` renders the template with every special-token string in the content
swapped for a random placeholder, then encodes: the template's own special tokens map to their
ids, and every stretch of text between them (placeholders restored to the original strings) is
encoded as plain text, so `<|im_end|>` typed by a user becomes the ids of the characters
`<`, `|`, `im`, ... exactly as the tokenizer encodes any text with special-token parsing off.
A prompt with no special-token string in its content takes the fast path and gets the ids it
always had (render, then encode with parsing on).

Pure functions over a `tokenizers.Tokenizer`; no state of their own.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence

from tokenizers import Encoding
from tokenizers import Tokenizer as BackendTokenizer


def special_pattern(specials: Sequence[str]) -> re.Pattern[str] | None:
    """A regex matching any of `specials`, longest first; None when there are none."""
    if not specials:
        return None
    ordered = sorted(set(specials), key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in ordered))


def encode_chat(
    messages: list[dict[str, str]],
    render: Callable[[list[dict[str, str]]], str],
    backend: BackendTokenizer,
    plain: BackendTokenizer,
    specials: re.Pattern[str] | None,
    add_special_tokens: bool = True,
) -> list[int]:
    """Ids of the rendered chat with special tokens in message content encoded as text.

    `render` applies the chat template; `backend` parses special tokens, `plain` is the same
    tokenizer with `encode_special_tokens = True` (parsing off); `specials` matches the
    special-token strings.
    """
    contents = [m.get("content") or "" for m in messages]
    if specials is None or not any(specials.search(c) for c in contents):  # encode_batch: no GIL
        return backend.encode_batch([render(messages)],
                                    add_special_tokens=add_special_tokens)[0].ids
    nonce = secrets.token_hex(8)
    originals: dict[str, str] = {}

    def hide(match: re.Match[str]) -> str:
        key = f"\ue000{nonce}.{len(originals)}\ue001"
        originals[key] = match.group(0)
        return key

    hidden = [{**m, "content": specials.sub(hide, c)} for m, c in zip(messages, contents,
                                                                        strict=True)]
    text = render(hidden)
    restore = re.compile("|".join(re.escape(k) for k in originals))
    texts, controls, position = [], [], 0
    for match in specials.finditer(text):  # only the template's own: content's are hidden
        texts.append(text[position:match.start()])
        controls.append(match.group(0))
        position = match.end()
    texts.append(text[position:])
    restored = [restore.sub(lambda m: originals[m.group(0)], t) for t in texts]
    plain_parts = plain.encode_batch(restored, add_special_tokens=False)
    control_parts = backend.encode_batch(controls, add_special_tokens=False) if controls else []
    encodings = [plain_parts[0]]
    for control, part in zip(control_parts, plain_parts[1:], strict=True):
        encodings += [control, part]
    merged = Encoding.merge([e for e in encodings if e.ids], growing_offsets=False)
    return backend.post_process(merged, add_special_tokens=add_special_tokens).ids
