"""A real llama.cpp ``llama-server`` on loopback, serving a tiny random-weight model.

The model is written here with the ``gguf`` package: the llama architecture, 2 layers of width
64, random weights, and a character-level SentencePiece-style vocabulary (every printable ASCII
character, "▁" for the space, byte fallback), so nothing is downloaded. Its replies are noise,
but constrained decoding (``response_format`` with a JSON schema) turns noise into replies of
exactly the requested shape, which is what the clients have to handle: bounded lists, enums,
finishing within ``max_tokens``.

The server binary is ``$RADGROUNDER_LLAMA_SERVER``, the one ``.ci/build-llama-server`` builds
from the llama.cpp sources on PyPI (into the user's cache), or ``llama-server`` on the PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def server_binary() -> Path | None:
    """The llama-server to test against, if one is built here."""
    given = os.environ.get("RADGROUNDER_LLAMA_SERVER")
    candidates = [Path(given)] if given else []
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates += sorted(cache.glob("radgrounder/llama-server-*/bin/llama-server"), reverse=True)
    found = shutil.which("llama-server")
    if found:
        candidates.append(Path(found))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def write_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer llama with random weights and a character vocabulary, as GGUF (F32)."""
    import gguf

    rng = np.random.default_rng(seed)
    pieces = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    pieces += [f"<0x{b:02X}>" for b in range(256)]  # byte fallback (the tokenizer needs it)
    types += [gguf.TokenType.BYTE] * 256
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += chars
    types += [gguf.TokenType.NORMAL] * len(chars)
    n_vocab, n_embd, n_ff, n_layer, n_head = len(pieces), 64, 128, 2, 4

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("radgrounder-test-tiny-llama")
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-1.0] * len(chars))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def t(name: str, *shape: int, scale: float = 0.05) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    ones("output_norm.weight", n_embd)
    # Byte tokens get logit 0 while the characters' are random (the largest of them > 0): the
    # model writes printable characters, one token each, so bounded strings fit their budget.
    head = (rng.standard_normal((n_vocab, n_embd)) * 0.05).astype(np.float32)
    head[3 : 3 + 256] = 0.0
    w.add_tensor("output.weight", head)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        for part in ("q", "k", "v", "output"):
            t(f"blk.{i}.attn_{part}.weight", n_embd, n_embd)
        ones(f"blk.{i}.ffn_norm.weight", n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(
    binary: Path, model: Path, *, slots: int = 2, api_key: str | None = None, log: Path
) -> Iterator[str]:
    """Run ``llama-server`` on a free loopback port; yields its base URL (``…/v1``)."""
    port = _free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(8192 * slots), "-t", "1", "--no-webui"]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server exited {proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llama-server not ready in 120 s: {log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
