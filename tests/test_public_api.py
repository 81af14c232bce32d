"""STYLE rule 2: the public surface is kvstore/__init__.py, matching shared/API.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore

# shared/ lies beside the repository (checkouts and CI clones alike)
API_MD = Path(__file__).resolve().parents[2] / "shared" / "API.md"


def test_all_is_sorted_and_every_name_resolves():
    assert kvstore.__all__ == sorted(kvstore.__all__)
    for name in kvstore.__all__:
        assert getattr(kvstore, name) is not None, name


def test_dir_lists_the_public_names():
    assert set(kvstore.__all__) <= set(dir(kvstore))


def _api_md_python_names() -> set[str]:
    text = API_MD.read_text()
    python = text[text.index("## Python"):]
    names = set(re.findall(r"kvstore\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)",
                           python))
    return {name for name in names}


@pytest.mark.skipif(not API_MD.exists(), reason="shared/API.md not present on this machine")
def test_every_name_of_api_md_python_section_resolves():
    names = _api_md_python_names()
    assert {"connect", "local", "KeyNotFoundError", "KVStoreError"} <= names
    for dotted in sorted(names):
        obj = kvstore
        for part in dotted.split("."):
            obj = getattr(obj, part)  # AttributeError names what is missing
        assert obj is not None
        assert dotted.split(".")[0] in kvstore.__all__, dotted


def test_store_methods_of_api_md_exist():
    methods = ["put", "get", "get_into", "exists", "remove", "batch_put", "batch_get_into",
               "batch_exists", "match_prefix", "stats", "close", "__enter__", "__exit__"]
    for name in methods:
        assert callable(getattr(kvstore.KVStore, name)), name
    for name in methods[:-3]:
        assert callable(getattr(kvstore.aio.AsyncKVStore, name)), name


def test_error_classes_form_one_tree():
    for name in kvstore.__all__:
        obj = getattr(kvstore, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, kvstore.KVStoreError), name


def test_import_kvstore_loads_neither_torch_nor_grpc():
    code = ("import sys, kvstore; kvstore.KVStoreError; "
            "print(sorted(m for m in ('torch', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_client_import_does_not_load_torch():
    code = "import sys, kvstore; kvstore.connect; kvstore.aio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
