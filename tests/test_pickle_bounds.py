"""Hostile or broken pickles given to `ectune import-edm` end in one clear error naming the file, quickly, within
bounded memory: shared-reference bombs, hash bombs, cycles, forged lengths, deep nesting."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

from ectune.cli import main

PERSISTENT = b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"  # GLOBAL opcode and its two lines


def network_pickle(init_kwargs: bytes) -> bytes:
    """{'ema': <persistent object whose state's _init_kwargs is the object built by `init_kwargs`>}, protocol 2."""
    meta = (b"}(X\x04\x00\x00\x00typeX\x05\x00\x00\x00class"
            b"X\x05\x00\x00\x00state}X\x0c\x00\x00\x00_init_kwargs" + init_kwargs + b"su")
    return b"\x80\x02}X\x03\x00\x00\x00ema" + PERSISTENT + meta + b"\x85R" + b"s."


def laughs(levels: int, fan: int = 10) -> bytes:
    """levels nested lists, each holding `fan` references to the one below: 10**levels objects when walked."""
    out = b"]q\x000"  # EMPTY_LIST, BINPUT 0, POP: each level lives in the memo only
    for k in range(1, levels + 1):
        out += b"]q" + bytes([k]) + b"(" + (b"h" + bytes([k - 1])) * fan + b"e0"  # list, memo k, MARK, BINGETs, APPENDS
    return out + b"h" + bytes([levels])


def tuple_bomb(levels: int) -> bytes:
    """t_k = (t_{k-1}, t_{k-1}): hashing t_levels walks 2**levels tuples."""
    out = b"K\x01\x85q\x000"  # (1,), memo 0, POP
    for k in range(1, levels + 1):
        out += b"h" + bytes([k - 1]) + b"h" + bytes([k - 1]) + b"\x86q" + bytes([k]) + b"0"  # TUPLE2, memo k, POP
    return out + b"h" + bytes([levels])


def nested(levels: int) -> bytes:
    """`levels` lists, each the only element of the next: MARKs first, the innermost list, then LIST opcodes."""
    return b"(" * levels + b"]" + b"l" * levels


def run_import(tmp_path: Path, payload: bytes, capsys: pytest.CaptureFixture) -> str:
    path = tmp_path / "hostile.pkl"
    path.write_bytes(payload)
    out = tmp_path / "out.safetensors"
    assert main(["import-edm", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ectune import-edm: error:") and str(path) in err, err
    assert "Traceback" not in err and not out.exists()
    return err


def test_the_builders_make_valid_pickles() -> None:
    """The payloads are real pickles (so the refusals below are the reader's doing, not a syntax error)."""
    assert pickle.loads(laughs(2, fan=3) + b".") == [[[]] * 3] * 3
    assert pickle.loads(b"\x80\x02" + laughs(2) + b".") == [[[]] * 10] * 10
    t: tuple = (1,)
    for _ in range(3):
        t = (t, t)
    assert pickle.loads(tuple_bomb(3) + b".") == t
    assert pickle.loads(nested(3) + b".") == [[[[]]]]
    with pytest.raises(ModuleNotFoundError, match="torch_utils"):  # a real load would import the EDM code base
        pickle.loads(network_pickle(b"}"))


@pytest.mark.timeout(30)
def test_shared_reference_bomb_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = network_pickle(laughs(12))  # 10**12 objects when walked, in under 500 bytes
    assert len(payload) < 500
    assert "expands to more than" in run_import(tmp_path, payload, capsys)


@pytest.mark.timeout(30)
def test_hash_bomb_in_a_dict_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = b"\x80\x02}" + tuple_bomb(60) + b"K\x01s."  # {t_60: 1}: hashing the key walks 2**60 tuples
    assert "dict key or set element" in run_import(tmp_path, payload, capsys)


@pytest.mark.timeout(30)
def test_cyclic_structure_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = network_pickle(b"]q\x00h\x00a")  # l = [l]
    assert "contains itself" in run_import(tmp_path, payload, capsys)


@pytest.mark.timeout(30)
def test_deep_nesting_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = network_pickle(nested(5000))
    assert "levels deep" in run_import(tmp_path, payload, capsys)


@pytest.mark.parametrize("opcode", [b"\x8d", b"\x8e", b"\x96"])  # BINUNICODE8, BINBYTES8, BYTEARRAY8
@pytest.mark.parametrize("length", [2**62, 2**63 - 1])
def test_forged_huge_lengths_are_refused_without_allocating(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          opcode: bytes, length: int) -> None:
    payload = b"\x80\x05" + opcode + struct.pack("<Q", length)  # 11 bytes declaring exabytes
    err = run_import(tmp_path, payload, capsys)
    # Refused by comparing the length with the file, not by a failed allocation (a 16 GB one would succeed).
    assert "not a readable EDM/EDM2 network pickle" in err and f"declares an object of {length:,} bytes" in err
