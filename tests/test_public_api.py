"""STYLE rule 2: the public surface is kvstore/__init__.py, matching shared/API.md."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore

# shared/ lies beside the repository (checkouts and CI clones alike)
API_MD = Path(__file__).resolve().parents[2] / "shared" / "API.md"
DOCS_API_MD = Path(__file__).resolve().parents[1] / "docs" / "API.md"


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


STORE_METHODS = ["put", "get", "get_into", "exists", "remove", "batch_put", "batch_get",
                 "batch_get_into", "batch_exists", "match_prefix", "remove_prefix", "pin",
                 "unpin", "stats", "register_memory", "close"]


def test_store_methods_exist_on_both_stores():
    public = {name for name, value in vars(kvstore.KVStore).items()
              if not name.startswith("_") and inspect.isfunction(value)}
    assert public == set(STORE_METHODS)       # a new method must join the list and the docs
    for name in [*STORE_METHODS, "__enter__", "__exit__"]:
        assert callable(getattr(kvstore.KVStore, name)), name
    for name in STORE_METHODS:
        method = getattr(kvstore.aio.AsyncKVStore, name)
        assert inspect.iscoroutinefunction(method), name


def _docs_api_md_methods() -> dict[str, list[str]]:
    """method -> parameter names, from the store table of the project's docs/API.md."""
    text = DOCS_API_MD.read_text()
    section = text[text.index("## Python: the store"):text.index("## Python: kernels")]
    methods: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        for name, args in re.findall(r"`([a-z_]+)\(([^)]*)\)`", line.split("|")[1]):
            params = [a.strip().split("=")[0] for a in args.split(",")]
            methods[name] = [p for p in params if p and p != "*"]
    return methods


def test_docs_api_md_store_table_matches_the_store():
    """Every method of the store table in docs/API.md exists with the parameters it shows,
    and every public store method is in the table."""
    documented = _docs_api_md_methods()
    assert set(documented) == set(STORE_METHODS)
    for name, params in documented.items():
        signature = inspect.signature(getattr(kvstore.KVStore, name))
        missing = [p for p in params if p not in signature.parameters]
        assert missing == [], f"docs/API.md shows {name}({', '.join(params)})"


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
