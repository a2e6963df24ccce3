"""The character tokenizer, the tiny-shakespeare loader (path, env var, checked download, offline error), batches."""

import hashlib
import io
import urllib.error

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from impl.gpt import CharTokenizer, load_shakespeare
from impl.gpt import data as gpt_data
from impl.gpt.data import SHAKESPEARE_SHA256, get_batch, train_val_split

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@given(st.text(alphabet=sorted(set(TEXT)), max_size=200))
def test_decode_inverts_encode(text):
    tok = CharTokenizer(TEXT)
    assert tok.decode(tok.encode(text)) == text


def test_vocabulary_is_the_sorted_characters():
    tok = CharTokenizer("cabbage")
    assert tok.chars == "abceg" and tok.vocab_size == 5
    assert tok.encode("bag") == [1, 0, 4]
    assert tok.decode(torch.tensor([4, 0, 1])) == "gab"


def test_tokenizer_bad_input():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="outside the vocabulary 'abc': got 'xz'"):
        tok.encode("axz")
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, 3\), got \[3\]"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="text must contain at least one character"):
        CharTokenizer("")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        CharTokenizer(b"abc")


def test_real_corpus(shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    text = load_shakespeare(shakespeare_path)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256
    tok = CharTokenizer(text)
    assert tok.vocab_size == 65  # nanoGPT's shakespeare_char meta.pkl
    train, val = train_val_split(torch.tensor(tok.encode(text)))
    assert (len(train), len(val)) == (1003854, 111540)  # nanoGPT's prepare.py prints these


def test_path_then_env_var(tmp_path, monkeypatch):
    given_file, env_file = tmp_path / "a.txt", tmp_path / "b.txt"
    given_file.write_text("from the path")
    env_file.write_text("from the env")
    monkeypatch.setenv("TINYSHAKESPEARE", str(env_file))
    assert load_shakespeare(given_file) == "from the path"
    assert load_shakespeare() == "from the env"


def test_bad_corpus(tmp_path):
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    latin1.write_bytes("Thou art café".encode("latin-1"))
    with pytest.raises(ValueError, match="must hold text, got an empty file"):
        load_shakespeare(empty)
    with pytest.raises(ValueError, match="must be UTF-8 text, got undecodable bytes at offset 12"):
        load_shakespeare(latin1)
    with pytest.raises(FileNotFoundError, match="corpus path must be an existing file, got .*missing.txt"):
        load_shakespeare(tmp_path / "missing.txt")


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def no_env_cache(tmp_path, monkeypatch):
    """No TINYSHAKESPEARE, and an empty cache directory."""
    monkeypatch.delenv("TINYSHAKESPEARE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "impl" / "tinyshakespeare.txt"


def test_download_checked_and_cached_once(no_env_cache, shakespeare_path, monkeypatch):
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file to serve as the download")
    with open(shakespeare_path, "rb") as f:
        body = f.read()
    calls = []
    monkeypatch.setattr(gpt_data.urllib.request, "urlopen", lambda url, timeout: calls.append(url) or _Response(body))
    first = load_shakespeare()
    second = load_shakespeare()
    assert first == second == body.decode("utf-8")
    assert no_env_cache.read_bytes() == body
    assert calls == [gpt_data.SHAKESPEARE_URL]


def test_download_with_wrong_checksum_is_not_cached(no_env_cache, monkeypatch):
    monkeypatch.setattr(gpt_data.urllib.request, "urlopen", lambda url, timeout: _Response(b"not shakespeare"))
    with pytest.raises(RuntimeError, match=f"expected {SHAKESPEARE_SHA256}; not cached"):
        load_shakespeare()
    assert not no_env_cache.exists()


def test_offline_says_how_to_provide_the_file(no_env_cache, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(gpt_data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="Offline.*load_shakespeare\\(path=...\\).*TINYSHAKESPEARE="):
        load_shakespeare()


def test_batches_are_windows_and_next_tokens():
    data = torch.arange(100)
    x, y = get_batch(data, block_size=8, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    torch.testing.assert_close(y, x + 1)  # the stream is 0..99, so the next token is the id plus one
    torch.testing.assert_close(x[:, 1:], x[:, :-1] + 1)
    with pytest.raises(ValueError, match="data must be longer than block_size=100 tokens, got 100"):
        get_batch(data, block_size=100, batch_size=1)
